"""End-to-end recipe of the bundled teacher: data -> evaluator -> VAE -> transformer -> pipeline -> baseline.

This is what ``sidflow teacher train`` runs; the assets under ``src/sidflow/digits/assets/`` are its output
(``sidflow teacher train --out src/sidflow/digits/assets --minutes 48``). Output layout of ``out``:

* ``evaluator/``: classifier weights, held-out and training-split (validation) feature statistics,
  ``evaluator.json`` (floor FID);
* ``teacher/``: a ``StableDiffusion3Pipeline.save_pretrained`` folder (fp32 safetensors);
* ``teacher_baseline.json``: the teacher's FID / accuracy / NFE / time at 1-64 Euler steps;
* ``teacher_train.json``: the recipe (all settings) and per-stage wall times.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sidflow.digits.baseline import STEPS, measure_teacher
from sidflow.digits.data import load_digits
from sidflow.digits.evaluator import Evaluator, FeatureStats, train_classifier
from sidflow.digits.pipeline import assemble_pipeline, build_transformer, encode_prompts, load_pipeline, write_sidecar
from sidflow.digits.teacher_train import RFConfig, train_rectified_flow
from sidflow.digits.text import CLASS_WORDS, prompts_for_class
from sidflow.digits.vae import build_vae, fit_latent_normalisation, train_vae

__all__ = ["TeacherRecipe", "build_teacher", "write_record"]


@dataclass(frozen=True)
class TeacherRecipe:
    """Every setting of the bundled-teacher recipe."""

    rf: RFConfig = field(default_factory=RFConfig)
    evaluator_epochs: int = 8
    vae_steps: int = 600
    heads: int = 4
    head_dim: int = 32
    layers: int = 4
    guidances: tuple[float, ...] = (1.0, 2.0)
    baseline_steps: tuple[int, ...] = STEPS
    baseline_samples: int = 1000
    limit_per_class: int | None = None  # train on a subset (tests only)
    seed: int = 0


def _stage(name: str, times: dict, start: float) -> float:
    now = time.perf_counter()
    times[name] = round(now - start, 1)
    print(f"[teacher] {name}: {times[name]:.1f} s", flush=True)
    return now


def _evaluator(train, recipe: TeacherRecipe) -> Evaluator:
    model = train_classifier(train.images, train.labels, epochs=recipe.evaluator_epochs, seed=recipe.seed)
    held_out = load_digits("held_out")
    probe = Evaluator(model, FeatureStats(torch.zeros(1), torch.zeros(1, 1)))
    feats, logits = probe.features_and_logits(held_out.images)
    # Validation statistics: all 4,000 training digits (checkpoint selection never sees the held-out ones).
    evaluator = Evaluator(
        model, FeatureStats.of(feats), validation=FeatureStats.of(probe.features_and_logits(train.images)[0])
    )
    # Real-vs-real floor: the first 100 training digits of each class against the 1,000 held-out ones.
    real = load_digits("train", limit_per_class=100)
    evaluator.info.update(
        floor_fid=evaluator.fid(real.images),
        floor_samples=len(real),
        held_out_accuracy=float((logits.argmax(1) == held_out.labels).float().mean()),
    )
    return evaluator


def build_teacher(out: str | Path, recipe: TeacherRecipe, *, progress: bool = True) -> dict:
    """Run the whole recipe, writing the assets under ``out``; returns the ``teacher_train.json`` dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = start = time.perf_counter()
    train = load_digits("train", limit_per_class=recipe.limit_per_class)

    evaluator = _evaluator(train, recipe)
    evaluator.save(out / "evaluator")
    print(
        f"[teacher] evaluator: held-out accuracy {evaluator.info['held_out_accuracy']:.3f}, "
        f"real-vs-real FID floor {evaluator.info['floor_fid']:.2f}"
    )
    start = _stage("evaluator", times, start)

    vae = train_vae(build_vae(recipe.seed), train.images, steps=recipe.vae_steps, seed=recipe.seed, progress=progress)
    shift, scale = fit_latent_normalisation(vae, train.images)
    with torch.no_grad():
        post = [vae.encode(x).latent_dist for x in train.images.split(500)]
    z_mean = (torch.cat([p.mean for p in post]) - shift) * scale
    z_std = torch.cat([p.std for p in post]) * scale
    start = _stage("vae", times, start)

    pipe = assemble_pipeline(
        build_transformer(heads=recipe.heads, head_dim=recipe.head_dim, layers=recipe.layers, seed=recipe.seed),
        vae,
        seed=recipe.seed,
    )
    prompts = [p for c in range(len(CLASS_WORDS)) for p in prompts_for_class(c)] + [""]
    embeds, pooled = encode_prompts(pipe, prompts)
    ema, rf_log = train_rectified_flow(
        pipe.transformer, (z_mean, z_std), train.labels, embeds, pooled, recipe.rf, progress=progress
    )
    pipe.transformer = ema
    pipe.register_modules(transformer=ema)
    pipe.save_pretrained(out / "teacher", safe_serialization=True)
    write_sidecar(out / "teacher")
    start = _stage("transformer", times, start)

    record = {
        "recipe": asdict(recipe),
        "seconds": times,
        "transformer_params": sum(p.numel() for p in ema.parameters()),
        "vae": {"shift_factor": shift, "scaling_factor": scale},
        "rf": rf_log,
        "evaluator": evaluator.info,
        "best": None,
        "torch_threads": torch.get_num_threads(),
    }
    write_record(out, record)  # now and after the baseline, so an interrupted baseline keeps it

    loaded = load_pipeline(out / "teacher")
    baseline = measure_teacher(
        loaded,
        evaluator,
        guidances=recipe.guidances,
        steps=recipe.baseline_steps,
        n=recipe.baseline_samples,
        out=out / "teacher_baseline.json",
        progress=progress,
    )
    _stage("baseline", times, start)
    times["total"] = round(time.perf_counter() - t0, 1)
    record["best"] = baseline.get("best")
    write_record(out, record)
    return record


def write_record(out: str | Path, record: dict) -> None:
    """Write the training record ``teacher_train.json`` into ``out``."""
    (Path(out) / "teacher_train.json").write_text(json.dumps(record, indent=2) + "\n")
