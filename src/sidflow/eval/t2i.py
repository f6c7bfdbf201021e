"""``eval.kind = "t2i"``: text-to-image quality of any diffusers teacher's student (issue 13).

At every evaluation the (EMA) generator draws one image per prompt of two fixed prompt sets, with
keyed noise (sample ``i`` of a set always starts from the same noise, whatever the batch or the
number of ranks):

* the **reported** set (``eval.prompts``, first ``eval.num_samples``): FD-DINOv2 / FID against the
  reference (``eval.reference``: real images, or the teacher's own samples of the same prompts from
  the same noise, "FD-T", which needs no real images), CLIP score and PickScore of each image against
  its prompt;
* the **validation** set (``eval.val_prompts``, disjoint from the reported one, first
  ``eval.val_samples``): the same figures against the teacher's samples of the validation prompts,
  stored as ``val_*``. Snapshot selection (``eval.select``) compares these only, so the reported
  reference never takes part in a choice.

Reference features are computed once and cached on disk (:mod:`sidflow.metrics.cache`), keyed by
the extractor, its preprocessing and the source: the teacher (folder, steps, guidance, prompts,
noise seed, latent shape) or the real image files.

Rank sharding: samples are dealt to ranks in chunks of ``eval.batch`` (chunk ``c`` to rank
``c % world``), so every chunk is computed exactly as one process would; per-image rows are gathered
(:func:`sidflow.collectives.gather_rows`) and every rank computes the same figures, in a training
run (every rank evaluates; under FSDP2 each with a gathered copy of the generator) as in
``sidflow eval`` under ``torchrun``. ``sec_per_image_{k}step`` is the job's wall time for the
reported set divided by its size (all ranks together, prompt encoding and scoring included).

The metric models (DINOv2, CLIP, PickScore: about 7 GB in fp32) wait in host memory and visit the
device only while scoring.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from sidflow.collectives import any_rank, gather_rows, sum_over_ranks
from sidflow.config import SiDConfig, to_dict
from sidflow.core import rng
from sidflow.core.denoiser import Denoiser
from sidflow.core.generator import generate, generator_step_times
from sidflow.core.guidance import with_embedded_guidance
from sidflow.data.images import iter_images, source_files
from sidflow.data.prompts import PromptSource
from sidflow.errors import ConfigError, DataError
from sidflow.metrics.cache import load_cached, source_identity, store_cached
from sidflow.metrics.frechet import FeatureStats
from sidflow.metrics.suite import DISTANCES, ImageMetrics, MetricModels

__all__ = ["T2IEvaluation", "EVAL_SEED", "LABELS", "default_feature_cache"]

EVAL_SEED = 1_000_003  # keys the evaluation noise (reported set; validation: EVAL_SEED + 1)
LABELS = {"fd_dinov2": "FD-DINOv2", "fid": "FID", "clip": "CLIP score", "pickscore": "PickScore"}
Rows = dict[str, Tensor]


def default_feature_cache() -> Path:
    """``$SIDFLOW_CACHE/features`` (default ``~/.cache/sidflow/features``)."""
    return Path(os.environ.get("SIDFLOW_CACHE", Path.home() / ".cache" / "sidflow")) / "features"


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


class T2IEvaluation:
    """The t2i protocol of a run (see the module doc).

    Args:
        config: the run's config (``eval.*``, the generator's schedule, guidance).
        teacher: the loaded teacher adapter (prompt encoding, decoding, reference samples).
        latent_shape: per-sample latent shape.
        device: where generation runs.
        prompts, val_prompts: the reported and validation prompt lists (resolved by the caller).
        metrics: the metric models (default: built from ``eval.*`` on ``device``).
        rank, world_size: this process's share of the samples (1 process: 0, 1).
        step_times: the generator's K step times (default: from ``config.generator``; an exported
            pipeline's ``sigmas``).
        prompt_source: encodes the evaluation prompts through the run's embedding caches (the
            run fills them before its text encoders leave the GPU); default: the teacher's encoders.
        teacher_precision: how the teacher network that samples the reference computes (keys its
            cache entries: a bf16 run's reference is not an fp32 one's).
    """

    def __init__(
        self,
        config: SiDConfig,
        teacher: Any,
        latent_shape: tuple[int, ...],
        device: torch.device | str,
        *,
        prompts: Sequence[str],
        val_prompts: Sequence[str] = (),
        metrics: ImageMetrics | None = None,
        rank: int = 0,
        world_size: int = 1,
        step_times: Sequence[float] | None = None,
        prompt_source: PromptSource | None = None,
        teacher_precision: str = "teacher weights",
    ) -> None:
        ec = config.eval
        self.config, self.teacher, self.device = config, teacher, torch.device(device)
        self.latent_shape = tuple(latent_shape)
        self.prompts = list(prompts)[: ec.num_samples]
        self.val_prompts = list(val_prompts)[: ec.val_samples]
        if len(self.prompts) < 2:
            raise ConfigError("eval.prompts needs at least 2 prompts for the t2i evaluation; give a longer prompt file")
        if self.val_prompts and set(self.val_prompts) & set(self.prompts):
            raise ConfigError(
                "eval.val_prompts shares prompts with eval.prompts; selection must never see the reported "
                "prompts: give disjoint prompt sets"
            )
        if ec.select != "final" and len(self.val_prompts) < 2:
            raise ConfigError(
                f"eval.select={ec.select} needs eval.val_prompts (validation prompts); or eval.select=final"
            )
        # the metric models wait in host memory and visit the device only while scoring
        self.metrics = metrics or ImageMetrics(
            ec.metrics,
            MetricModels(ec.dino_model, ec.clip_model, ec.pickscore_model, ec.pickscore_tokenizer),
            "cpu",
            batch=ec.batch,
        )
        if self.metrics.skipped and rank == 0:
            print("note: " + "; ".join(f"skipping {name}: {why}" for name, why in self.metrics.skipped.items()))
        self.encode = prompt_source.encode if prompt_source is not None else teacher.encode_prompts
        self._teacher_precision = teacher_precision
        self.selection_metric = next((m for m in self.metrics.names if m in DISTANCES), None)
        if ec.select != "final" and self.selection_metric is None:
            raise ConfigError(f"eval.select={ec.select} needs a distance in eval.metrics (fd_dinov2 or fid)")
        self.rank, self.world_size = rank, world_size
        gc = config.generator
        self.step_times = list(step_times or generator_step_times(gc.num_steps, gc.t_init, gc.shift))
        self.cache_dir = Path(ec.feature_cache) if ec.feature_cache else default_feature_cache()
        self.guidance = ec.teacher_guidance if ec.teacher_guidance is not None else config.guidance.kappa4
        self._references: dict[str, tuple[dict[str, FeatureStats], dict[str, float]]] = {}
        self._teacher_net: Denoiser | None = None  # a copy to sample the reference with (FSDP2 runs)

    # -- sharing work between ranks -------------------------------------------------------------
    def _my_chunks(self, n: int) -> list[list[int]]:
        batch = self.config.eval.batch
        chunks = [list(range(lo, min(lo + batch, n))) for lo in range(0, n, batch)]
        return chunks[self.rank :: self.world_size]

    def _gather(self, parts: list[tuple[list[int], Rows]]) -> Rows:
        indices = [i for idx, _ in parts for i in idx]
        names = parts[0][1].keys() if parts else ()
        local = {k: torch.cat([rows[k] for _, rows in parts]) for k in names}
        if self.world_size == 1:
            return local
        return gather_rows(local, indices)

    def _rows_of(self, prompts: list[str], images_of: Callable[[list[int]], Tensor], *, with_text: bool) -> Rows:
        """Per-image rows of every sample of a set, this rank's chunks computed here."""
        parts = []
        for idx in self._my_chunks(len(prompts)):
            texts = [prompts[i] for i in idx]
            parts.append((idx, self.metrics.rows(images_of(idx), texts if with_text else None)))
        return self._gather(parts)

    # -- images ----------------------------------------------------------------------------------
    def _noise(self, idx: list[int], seed: int) -> Tensor:
        return rng.randn_per_sample(self.latent_shape, seed=seed, iteration=0, stream="sample/z", indices=idx)

    def student_images(self, generator: Denoiser, prompts: list[str], idx: list[int], steps: int, seed: int) -> Tensor:
        """Decoded images ``[b, 3, H, W]`` (CPU, float32) of samples ``idx`` after ``steps`` generator steps."""
        gc = self.config.generator
        cond = with_embedded_guidance(self.encode([prompts[i] for i in idx]), self.config.guidance.embedded_generator)
        latents = generate(
            generator,
            cond,
            self.latent_shape,
            steps=steps,
            step_times=self.step_times,
            noise_type=gc.noise_type,
            seed=seed,
            indices=idx,
            device=self.device,
        )
        return self.teacher.decode_latents(latents).float().cpu()

    def _student_source(
        self, generator: Denoiser, prompts: list[str], steps: int, seed: int
    ) -> Callable[[list[int]], Tensor]:
        return lambda idx: self.student_images(generator, prompts, idx, steps, seed)

    def teacher_images(self, prompts: list[str], idx: list[int], seed: int) -> Tensor:
        """The teacher's Euler samples of ``idx`` from the students' initial noise (the FD-T reference)."""
        latents = self.teacher.sample(
            [prompts[i] for i in idx],
            self._noise(idx, seed),
            num_steps=self.config.eval.teacher_steps,
            guidance_scale=self.guidance,
            denoiser=self._teacher_net,
        )
        return self.teacher.decode_latents(latents).float().cpu()

    # -- references ------------------------------------------------------------------------------
    def _source(self, split: str) -> dict[str, Any]:
        ec = self.config.eval
        prompts, seed = (self.prompts, EVAL_SEED) if split == "reported" else (self.val_prompts, EVAL_SEED + 1)
        if split == "reported" and ec.reference != "teacher":
            files = source_files(ec.reference)
            return {"kind": "images", "files": source_identity(files), "resolution": self.config.data.resolution}
        return {
            "kind": "teacher",
            "teacher": to_dict(self.config)["teacher"],  # path, dtype, time scale, text length
            "text": self.teacher.encoder_settings() if hasattr(self.teacher, "encoder_settings") else {},
            "network": self._teacher_precision,
            "steps": ec.teacher_steps,
            "guidance": self.guidance,
            "prompts": _digest(prompts),
            "n": len(prompts),
            "seed": seed,
            "latent_shape": list(self.latent_shape),
        }

    def _splits(self) -> list[str]:
        return ["reported", "validation"] if self.val_prompts else ["reported"]

    def prepare_references(self, teacher_net: Callable[[], Denoiser | None]) -> None:
        """Compute (or read from the cache) every reference before the first evaluation, sampling the
        teacher with ``teacher_net()`` (called once, and only when a teacher reference is missing:
        under FSDP2 it gathers a copy of the teacher, a collective, dropped here when done)."""
        missing = any(self._missing(split) for split in self._splits())
        if self.world_size > 1:  # compute when any rank misses one (caches local to a node may differ)
            missing = any_rank(missing)
        if not missing:
            for split in self._splits():
                self.reference(split)
            return
        self._teacher_net = teacher_net()
        try:
            for split in self._splits():
                self.reference(split)
        finally:
            self._teacher_net = None

    def _descriptions(self, split: str) -> dict[str, dict[str, Any]]:
        source = self._source(split)
        names = list(self.metrics.extractors) + (
            [n for n in ("clip", "pickscore") if n in self.metrics.names] if source["kind"] == "teacher" else []
        )
        return {name: {**self.metrics.describe(name), **source} for name in names}

    def _missing(self, split: str) -> bool:
        """Whether this rank's cache lacks a reference entry of ``split``."""
        return any(load_cached(self.cache_dir, d) is None for d in self._descriptions(split).values())

    def reference(self, split: str) -> tuple[dict[str, FeatureStats], dict[str, float]]:
        """``(fits by feature row, the reference's own figures)`` of ``split`` ("reported" or
        "validation"): from the cache, else computed (all ranks share the work) and cached by rank 0."""
        if split in self._references:
            return self._references[split]
        with self.metrics.on(self.device):
            return self._reference(split)

    def _reference(self, split: str) -> tuple[dict[str, FeatureStats], dict[str, float]]:
        source = self._source(split)
        descriptions = self._descriptions(split)
        hits = {name: load_cached(self.cache_dir, d) for name, d in descriptions.items()}
        compute = any(h is None for h in hits.values())
        if self.world_size > 1:  # one decision for all ranks: compute (together) when any rank misses one
            compute = any_rank(compute)
        if compute:
            rows = self._reference_rows(split, source)
            fits = {
                name: store_cached(
                    self.cache_dir if self.rank == 0 else None, d, rows[name].reshape(len(rows[name]), -1)
                )
                for name, d in descriptions.items()
            }
        else:
            fits = {name: cast(tuple, hit)[1] for name, hit in hits.items()}
        figures: dict[str, float] = {name: float(fits[name].mu[0]) for name in ("clip", "pickscore") if name in fits}
        self._references[split] = ({n: f for n, f in fits.items() if n in self.metrics.extractors}, figures)
        return self._references[split]

    def _reference_rows(self, split: str, source: dict[str, Any]) -> Rows:
        ec = self.config.eval
        if source["kind"] == "teacher":
            prompts, seed = (self.prompts, EVAL_SEED) if split == "reported" else (self.val_prompts, EVAL_SEED + 1)
            return self._rows_of(prompts, lambda idx: self.teacher_images(prompts, idx, seed), with_text=True)
        skipped = [0]
        share = (self.rank, self.world_size)
        images = iter_images(ec.reference, self.config.data.resolution, batch=ec.batch, skipped=skipped, share=share)
        rows = self._gather([(idx, self.metrics.rows(batch)) for idx, batch in images])
        bad = int(sum_over_ranks(torch.tensor(skipped[0])).item()) if self.world_size > 1 else skipped[0]
        if self.rank == 0 and bad:
            print(f"note: {bad} unreadable reference images in {ec.reference} were skipped")
        if not rows or len(next(iter(rows.values()))) < 2:
            raise DataError(f"eval.reference={ec.reference} has fewer than 2 readable images; give a larger set")
        return rows

    # -- the Evaluation protocol -----------------------------------------------------------------
    def score_student(
        self, generator: Denoiser, images_seen: int, *, steps: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Figures of ``generator`` at each of ``steps`` (default ``eval.student_steps``)."""
        for split in self._splits():
            self.reference(split)
        with self.metrics.on(self.device):
            return self._score(generator, images_seen, steps)

    def _score(self, generator: Denoiser, images_seen: int, steps: Sequence[int] | None) -> dict[str, Any]:
        was_training = cast(Any, generator).training
        cast(Any, generator).eval()
        row: dict[str, Any] = {"images_seen": images_seen}
        splits = [("reported", "", self.prompts, EVAL_SEED)]
        if self.val_prompts:
            splits.append(("validation", "val_", self.val_prompts, EVAL_SEED + 1))
        for k in steps or self.config.eval.student_steps:
            for split, prefix, prompts, seed in splits:
                fits, _ = self.reference(split)
                start = time.perf_counter()
                rows = self._rows_of(prompts, self._student_source(generator, prompts, k, seed), with_text=True)
                for name, value in self.metrics.summarise(rows, fits).items():
                    row[f"{prefix}{name}_{k}step"] = value
                if not prefix:
                    row[f"sec_per_image_{k}step"] = (time.perf_counter() - start) / len(prompts)
        cast(Any, generator).train(was_training)
        return row

    def describe(self, row: dict[str, Any], *, steps: Sequence[int] | None = None) -> str:
        parts = []
        for k in steps or self.config.eval.student_steps:
            shown = [f"{LABELS[m]} {row[f'{m}_{k}step']:.2f}" for m in self.metrics.names if f"{m}_{k}step" in row]
            parts.append(f"{k} step{'s' if k > 1 else ''}: " + " ".join(shown))
        where = f"[eval @ {row['images_seen'] / 1000:.1f}k images] " if "images_seen" in row else "[eval] "
        return where + "; ".join(parts)

    def teacher_reference(self) -> dict[str, Any]:
        """The teacher's own CLIP score / PickScore on the reported prompts (when its samples are the reference)."""
        if self.config.eval.reference != "teacher" or "reported" not in self._references:
            return {}
        figures = self._references["reported"][1]
        return (
            {"t2i": {"steps": self.config.eval.teacher_steps, "guidance": self.guidance, **figures}} if figures else {}
        )

    def grid(self, n: int) -> tuple[list[str], Tensor]:
        """The first ``n`` reported prompts with their evaluation noise."""
        idx = list(range(min(n, len(self.prompts))))
        return [self.prompts[i] for i in idx], self._noise(idx, EVAL_SEED)
