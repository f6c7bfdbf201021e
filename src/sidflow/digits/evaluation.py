"""The ``eval.kind = "digits"`` protocol of the bundled teacher: same prompts, seeds and evaluator
as the teacher baseline.

1,000 samples, 100 per class, from the fixed initial noise of :func:`sidflow.digits.baseline.eval_set`
(the teacher baseline uses the very same tensor); the fresh noise of later generator steps is keyed
by ``(seed, i)`` so figures do not depend on the batch size. Each row holds, per evaluated step
count, the FID against the 1,000 held-out digits (reported), the prompt accuracy, and the
validation FID against the 4,000 training digits (snapshot selection; the held-out digits never
take part in any choice).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sidflow.config import SiDConfig
from sidflow.core.denoiser import Denoiser
from sidflow.core.generator import generate, generator_step_times
from sidflow.core.guidance import with_embedded_guidance
from sidflow.digits import BUNDLED_TEACHER
from sidflow.digits.baseline import EVAL_SEED, eval_set
from sidflow.digits.evaluator import Evaluator

__all__ = ["DigitsEvaluation"]

BATCH = 250  # samples per network pass and per decode


class DigitsEvaluation:
    """Digits protocol: the bundled evaluator on the bundled teacher's fixed evaluation set."""

    def __init__(
        self,
        config: SiDConfig,
        teacher: Any,
        latent_shape: tuple[int, ...],
        device: torch.device,
        baseline: Path = BUNDLED_TEACHER.parent / "teacher_baseline.json",
    ) -> None:
        self.config, self.teacher, self.device = config, teacher, device
        self.latent_shape = tuple(latent_shape)
        self.seed = EVAL_SEED
        self.set = eval_set(config.eval.num_samples)
        if tuple(self.set.noise.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"digits evaluation needs latents {tuple(self.set.noise.shape[1:])}, the run has "
                f"{self.latent_shape}; use data.resolution=32 with the bundled teacher"
            )
        self.evaluator = Evaluator.load()
        self.cond = teacher.encode_prompts(self.set.prompts).to("cpu")
        self.baseline = Path(baseline)

    def images(self, generator: Denoiser, steps: int) -> tuple[Tensor, float]:
        """Decoded student images of the evaluation set and the wall time per image."""
        start = time.perf_counter()
        gc = self.config.generator
        cond = with_embedded_guidance(self.cond, self.config.guidance.embedded_generator)
        latents = (
            generate(
                generator,
                cond,
                self.latent_shape,
                steps=steps,
                step_times=generator_step_times(gc.num_steps, gc.t_init, gc.shift),
                noise_type=gc.noise_type,
                seed=self.seed,
                z=self.set.noise,
                batch=BATCH,
                device=self.device,
            )
            .float()
            .cpu()
        )
        images = torch.cat([self.teacher.decode_latents(x.to(self.device)).float().cpu() for x in latents.split(BATCH)])
        return images, (time.perf_counter() - start) / len(images)

    def score_student(self, generator: Denoiser, images_seen: int) -> dict[str, Any]:
        was_training = generator.training  # type: ignore[attr-defined]
        generator.eval()  # type: ignore[attr-defined]
        row: dict[str, Any] = {"images_seen": images_seen}
        for steps in self.config.eval.student_steps:
            images, sec = self.images(generator, steps)
            score = self.evaluator.score(images, self.set.labels)
            row[f"fid_{steps}step"] = score["fid"]
            row[f"acc_{steps}step"] = score["accuracy"]
            if "val_fid" in score:
                row[f"val_fid_{steps}step"] = score["val_fid"]
            row[f"sec_per_image_{steps}step"] = sec
        generator.train(was_training)  # type: ignore[attr-defined]
        return row

    def describe(self, row: dict[str, Any]) -> str:
        parts = [
            f"{k.removeprefix('fid_')}: FID {row[k]:.1f} acc {row[k.replace('fid_', 'acc_')]:.3f}"
            for k in row
            if k.startswith("fid_")
        ]
        return f"[eval @ {row['images_seen'] / 1000:.1f}k images] " + "; ".join(parts)

    def teacher_reference(self) -> dict[str, Any]:
        """The cached teacher baseline (``teacher_baseline.json`` next to the bundled teacher)."""
        return json.loads(self.baseline.read_text()) if self.baseline.is_file() else {}

    def grid(self, n: int) -> tuple[list[str], Tensor]:
        """``n`` prompts spread evenly over the evaluation set, with their fixed noise."""
        total = len(self.set.prompts)
        idx = [int(i * total / n) for i in range(n)]
        return [self.set.prompts[i] for i in idx], self.set.noise[idx]
