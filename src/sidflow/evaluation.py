"""Scoring a student during and after a run: same prompts, same seeds, same evaluator as the teacher.

:func:`sample_student` runs the first ``steps`` steps of the trained K-step schedule (spec 3.1/3.4:
the 1-step output is the truncated schedule's first x0-prediction, as in training). The initial
noise of evaluation sample ``i`` is fixed (the teacher baseline uses the very same tensor), and the
fresh noise of later steps is keyed by ``(seed, i)`` so figures do not depend on the batch size.

:class:`StudentEvaluation` is the ``eval.kind = "digits"`` protocol of the bundled teacher: 1,000
samples, 100 per class, prompt accuracy and FID in the bundled classifier's feature space.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sidflow.config import SiDConfig
from sidflow.denoiser import Cond, Denoiser
from sidflow.generator import draw_fresh_noise, generator_step_times, sample_generator
from sidflow.guidance import with_embedded_guidance
from sidflow.rng import randn_per_sample

__all__ = ["sample_student", "StudentEvaluation", "make_evaluation"]


@torch.no_grad()
def sample_student(generator: Denoiser, cond: Cond, latent_shape: tuple[int, ...], config: SiDConfig, *,
                   steps: int, seed: int, device: torch.device | str, z: Tensor | None = None,
                   indices: list[int] | None = None, batch: int = 250) -> Tensor:
    """Latents ``[N, *latent_shape]`` from the first ``steps`` steps of the generator's schedule.

    Args:
        generator: the trained generator (conditional only, no CFG).
        cond: conditioning of the ``N`` samples.
        latent_shape: per-sample latent shape.
        config: the run config (step schedule, noise type, embedded guidance).
        steps: how many of the K steps to run (1..K).
        seed: keys the fresh noise (and ``z`` when not given).
        z: optional fixed initial noise ``[N, *latent_shape]``.
        indices: global sample indices keying the draws (default ``0..N-1``).
        batch: samples per forward pass.
    """
    gc = config.generator
    n = len(cond)
    indices = list(range(n)) if indices is None else list(indices)
    if z is None:
        z = randn_per_sample(latent_shape, seed=seed, iteration=0, stream="sample/z", indices=indices)
    times = generator_step_times(gc.num_steps, gc.t_init, gc.shift)
    gcond = with_embedded_guidance(cond, config.guidance.embedded_generator)
    out = []
    for lo in range(0, n, batch):
        idx = indices[lo:lo + batch]
        fresh = draw_fresh_noise(latent_shape, gc.num_steps, seed=seed, iteration=0, stream="sample/fresh",
                                 indices=idx, device=device)
        out.append(sample_generator(generator, z[lo:lo + batch].to(device), gcond.index(slice(lo, lo + batch))
                                    .to(device), k=steps, step_times=times, noise_type=gc.noise_type,
                                    fresh_noise=fresh).float().cpu())
    return torch.cat(out)


class StudentEvaluation:
    """Digits protocol: the bundled evaluator on the bundled teacher's fixed evaluation set."""

    def __init__(self, config: SiDConfig, teacher, latent_shape: tuple[int, ...], device: torch.device,
                 teacher_path: str | Path) -> None:
        from sidflow.embedded.baseline import EVAL_SEED, eval_set
        from sidflow.embedded.evaluator import Evaluator

        self.config, self.teacher, self.device = config, teacher, device
        self.latent_shape = tuple(latent_shape)
        self.seed = EVAL_SEED
        self.set = eval_set(config.eval.num_samples)
        if tuple(self.set.noise.shape[1:]) != self.latent_shape:
            raise ValueError(f"digits evaluation needs latents {tuple(self.set.noise.shape[1:])}, the run has "
                             f"{self.latent_shape}; use data.resolution=32 with the bundled teacher")
        self.evaluator = Evaluator.load()
        self.cond = teacher.encode_prompts(self.set.prompts).to("cpu")
        self.teacher_path = Path(teacher_path)

    def images(self, generator: Denoiser, steps: int) -> tuple[Tensor, float]:
        """Decoded student images of the evaluation set and the wall time per image."""
        start = time.perf_counter()
        latents = sample_student(generator, self.cond, self.latent_shape, self.config, steps=steps,
                                 seed=self.seed, device=self.device, z=self.set.noise)
        images = torch.cat([self.teacher.decode_latents(x.to(self.device)).float().cpu()
                            for x in latents.split(250)])
        return images, (time.perf_counter() - start) / len(images)

    def score_student(self, generator: Denoiser, images_seen: int) -> dict[str, Any]:
        was_training = generator.training
        generator.eval()
        row: dict[str, Any] = {"images_seen": images_seen}
        for steps in self.config.eval.student_steps:
            images, sec = self.images(generator, steps)
            score = self.evaluator.score(images, self.set.labels)
            row[f"fid_{steps}step"] = score["fid"]
            row[f"acc_{steps}step"] = score["accuracy"]
            if "val_fid" in score:
                row[f"val_fid_{steps}step"] = score["val_fid"]
            row[f"sec_per_image_{steps}step"] = sec
        generator.train(was_training)
        return row

    @staticmethod
    def describe(row: dict[str, Any]) -> str:
        parts = [f"{k.removeprefix('fid_')}: FID {row[k]:.1f} acc {row[k.replace('fid_', 'acc_')]:.3f}"
                 for k in row if k.startswith("fid_")]
        return f"[eval @ {row['images_seen'] / 1000:.1f}k images] " + "; ".join(parts)

    def teacher_reference(self) -> dict[str, Any]:
        """The cached teacher baseline (``teacher_baseline.json`` next to the bundled teacher)."""
        path = self.teacher_path.parent / "teacher_baseline.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def make_evaluation(config: SiDConfig, teacher, latent_shape: tuple[int, ...], device: torch.device
                    ) -> StudentEvaluation | None:
    """The evaluation protocol named by ``eval.kind`` (None for ``"none"``)."""
    if config.eval.kind == "none":
        return None
    from sidflow.pipeline_runner import resolve_teacher_path

    return StudentEvaluation(config, teacher, latent_shape, device, resolve_teacher_path(config.teacher.path))
