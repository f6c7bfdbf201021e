"""The bundled teacher's baseline: FID and prompt accuracy of Euler sampling at 1-64 steps.

Every figure in sidflow's embedded benchmark uses the same evaluation set: ``n`` samples (default
1,000), sample ``i`` prompted with class ``i // (n / 10)`` in phrasing ``i % 5``, from the fixed
initial noise ``randn_per_sample(seed=EVAL_SEED, stream="eval_noise", indices=[i])``. The teacher
is sampled by the stock ``StableDiffusion3Pipeline.__call__`` (Euler, ``FlowMatchEulerDiscreteScheduler``);
NFE counts both classifier-free-guidance passes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from sidflow.core.rng import randn_per_sample
from sidflow.digits.evaluator import Evaluator
from sidflow.digits.pipeline import encode_prompts
from sidflow.digits.text import PHRASINGS, prompt_for
from sidflow.digits.vae import decode_latents

__all__ = ["EVAL_SEED", "STEPS", "EvalSet", "eval_set", "measure_teacher", "pipeline_images"]

EVAL_SEED = 20240601
STEPS = (1, 2, 4, 8, 16, 32, 64)
LATENT_SHAPE = (4, 16, 16)


@dataclass(frozen=True)
class EvalSet:
    """Fixed evaluation prompts: ``prompts`` (N strings), ``labels`` ``[N]``, ``noise`` ``[N, 4, 16, 16]``."""

    prompts: list[str]
    labels: torch.Tensor
    noise: torch.Tensor


def eval_set(n: int = 1000) -> EvalSet:
    """The shared evaluation set: ``n / 10`` samples per class, phrasings cycling, fixed noise."""
    per_class = n // 10
    labels = torch.arange(n) // per_class
    prompts = [prompt_for(int(c), i % len(PHRASINGS)) for i, c in enumerate(labels)]
    noise = randn_per_sample(LATENT_SHAPE, seed=EVAL_SEED, iteration=0, stream="eval_noise", indices=range(n))
    return EvalSet(prompts=prompts, labels=labels, noise=noise)


@torch.no_grad()
def pipeline_images(
    pipe: StableDiffusion3Pipeline, es: EvalSet, *, steps: int, guidance: float, batch: int = 250
) -> tuple[torch.Tensor, float]:
    """Teacher images ``[N, 1, 32, 32]`` in [-1, 1] and the wall time per image (s, decode included)."""
    pipe.set_progress_bar_config(disable=True)
    embeds, pooled = encode_prompts(pipe, es.prompts)
    neg, neg_pooled = encode_prompts(pipe, [""])
    images, start = [], time.perf_counter()
    for lo in range(0, len(es.prompts), batch):
        sl = slice(lo, lo + batch)
        b = embeds[sl].shape[0]
        latents = pipe(
            prompt_embeds=embeds[sl],
            pooled_prompt_embeds=pooled[sl],
            negative_prompt_embeds=neg.expand(b, -1, -1),
            negative_pooled_prompt_embeds=neg_pooled.expand(b, -1),
            latents=es.noise[sl],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=32,
            width=32,
            output_type="latent",
        ).images
        images.append(decode_latents(pipe.vae, latents))
    return torch.cat(images), (time.perf_counter() - start) / len(es.prompts)


def measure_teacher(
    pipe: StableDiffusion3Pipeline,
    evaluator: Evaluator,
    *,
    guidances: tuple[float, ...],
    steps: tuple[int, ...] = STEPS,
    n: int = 1000,
    out: str | Path | None = None,
    keep: list[dict] | None = None,
    progress: bool = True,
) -> dict:
    """Score the teacher at every (steps, guidance); write the JSON to ``out`` after each row.

    ``keep``: rows of an earlier measurement (same teacher and ``n``) for other guidance scales,
    carried over unchanged.
    """
    from tqdm.auto import tqdm

    es = eval_set(n)
    kept = [r for r in (keep or []) if r["guidance"] not in guidances]
    result: dict = {
        "num_samples": n,
        "eval_seed": EVAL_SEED,
        "sampler": "StableDiffusion3Pipeline Euler",
        "floor_fid": evaluator.info.get("floor_fid"),
        "rows": kept,
    }
    grid = [(g, k) for g in guidances for k in steps]
    for g, k in tqdm(grid, desc="teacher baseline", disable=not progress):
        images, sec = pipeline_images(pipe, es, steps=k, guidance=g)
        nfe = k * (2 if g > 1 else 1)  # the pipeline runs the [uncond; cond] pair only when g > 1
        row = {"steps": k, "guidance": g, "nfe": nfe, **evaluator.score(images, es.labels), "seconds_per_image": sec}
        result["rows"].append(row)
        best = min(result["rows"], key=lambda r: r["fid"])
        result["best"] = best
        if result["floor_fid"]:
            result["best_fid_over_floor"] = best["fid"] / result["floor_fid"]
        if out is not None:
            Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
