"""The bundled digits benchmark as a sidflow plugin (entry point ``sidflow.plugins: digits``).

It registers, into the run layer's registries: the ``digits`` preset (the default ``sidflow
distill``), the ``eval.kind=digits`` evaluation, ``teacher.path=bundled`` (the tiny SD3 teacher
shipped in ``sidflow/digits/assets/teacher``) and ``data.prompts=builtin:digits``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sidflow.config import (
    DataConfig,
    EvalConfig,
    GeneratorConfig,
    GuidanceConfig,
    LoraConfig,
    LossConfig,
    OptimConfig,
    SiDConfig,
    TeacherConfig,
    TrainConfig,
)
from sidflow.digits import BUNDLED_TEACHER
from sidflow.run.presets import register_preset
from sidflow.run.registry import (
    register_evaluation,
    register_image_set,
    register_prompt_set,
    register_teacher_alias,
    resolve_teacher_path,
)
from sidflow.teachers.families import FAMILIES

__all__ = ["register", "DIGITS_PRESET", "DIGITS_LORA_PRESET", "digits_preset", "digits_lora_preset", "digit_prompts"]

DIGITS_PRESET = "digits"
DIGITS_LORA_PRESET = "digits-lora"
BUNDLED = "bundled"  # teacher.path naming the tiny SD3 teacher shipped with sidflow


def digits_preset() -> SiDConfig:
    """The bundled teacher, sized for about 9 minutes on a 2-core CPU, evaluation included: 600 iterations.

    Tuned in short runs against the bundled teacher (whose best is w = 1.5 at 8 Euler steps): the SiD
    teacher term uses kappa4 = 1.25 while the fake score runs unguided (kappa1 = kappa2 = 1, one
    pass); kappa4 = 1.5 over-sharpened the 4-step output, 1.3 was worse than 1.25, and kappa4 = 1
    left accuracy at 0.93. The fake score learns 3x faster than the generator (lr 3e-4 vs glr 1e-4).
    k = 1 is drawn twice as often as each of k = 2, 3, 4 (``k_weights``): with the paper's uniform
    draw the one-step output lagged (FID ~60 against ~40). alpha = 1.5 gives the best 4-step output
    (alpha 1 and 1.2 leave it at 21-28), while the 1-step output keeps improving after the 4-step
    one peaks, so the run keeps the EMA snapshot with the best validation FID (training digits;
    spec 9) for each step count separately, never looking at the held-out set.
    """
    return SiDConfig(
        teacher=TeacherConfig(kind="pipeline", path=BUNDLED),
        generator=GeneratorConfig(num_steps=4, noise_type="fresh", k_weights=(2.0, 1.0, 1.0, 1.0)),
        loss=LossConfig(alpha=1.5),
        guidance=GuidanceConfig(kappa1=1.0, kappa2=1.0, kappa4=1.25),
        optim=OptimConfig(lr=3e-4, glr=1e-4),
        train=TrainConfig(batch=32, batch_gpu=32, max_steps=600, log_every=10, ckpt_every=100, ema_halflife_kimg=2.0),
        data=DataConfig(prompts="builtin:digits", resolution=32),
        eval=EvalConfig(
            kind="digits",
            every_kimg=4.8,
            num_samples=1000,
            student_steps=(1, 4),
            teacher_grid_steps=(4, 8),
            grid_size=20,
            select="validation_per_steps",
        ),
    )


def digits_lora_preset() -> SiDConfig:
    """The default run in LoRA mode (issue 12): one frozen bundled teacher, the fake score and the
    generator two rank-64 adapters on it, the same iterations and evaluation as ``digits``.

    Chosen on the validation FIDs (training digits) of 300-iteration runs only, never on the held-out
    set (README, "LoRA mode"): the family's default targets (attention and MLP projections) left the
    one-step output diverging (validation FID 227 -> 258 over 4.8k -> 9.6k images at rank 32), adding
    the blocks' AdaLN modulation layers (``norm1.linear``, ``norm1_context.linear``: where the time
    enters each block) turned it around (150 -> 114), rank 64 over 32 helped both step counts
    (1 step 79, 4 steps 11.1 at 9.6k), and drawing k = 1 three times as often as each other k (the
    default draws it twice as often) moved the one-step output further (65.2, 4 steps 12.4: the best
    mean log validation FID over both). The adapters take larger steps than full fine-tuning (a LoRA
    update moves ``B`` against a fixed random ``A``): lr 1e-3 / glr 3e-4; glr 1e-4 was worse at both
    step counts, 5e-4 traded the four-step output for the one-step one (57.0 / 16.3), 1e-3 was
    unstable at four steps.
    """
    base = digits_preset()
    return dataclasses.replace(
        base,
        lora=LoraConfig(rank=64, alpha=64.0, targets=(*FAMILIES["sd3"].lora_targets, *ADALN)),
        optim=dataclasses.replace(base.optim, lr=LORA_LR[0], glr=LORA_LR[1]),
        generator=dataclasses.replace(base.generator, k_weights=(3.0, 1.0, 1.0, 1.0)),
    )


LORA_LR = (1e-3, 3e-4)  # (fake score, generator) adapters
ADALN = ("norm1.linear", "norm1_context.linear")  # the joint blocks' time/pooled-text modulation


def digit_prompts() -> list[str]:
    """The 50 training prompts: 10 digits x 5 phrasings."""
    from sidflow.digits.text import PHRASINGS, prompt_for

    return [prompt_for(c, p) for c in range(10) for p in range(len(PHRASINGS))]


def _evaluation(config: SiDConfig, teacher: Any, latent_shape: tuple[int, ...], device: torch.device, **_: Any):
    from sidflow.digits.evaluation import DigitsEvaluation  # lazy: diffusers

    # the teacher's own baseline figures, next to its folder (sidflow teacher train --out DIR)
    baseline = Path(resolve_teacher_path(config.teacher.path)).parent / "teacher_baseline.json"
    return DigitsEvaluation(config, teacher, latent_shape, device, baseline=baseline)


TRAIN_IMAGES = "digits-train"  # data.real=builtin:digits-train, SiDA's real images


def training_digits_folder() -> Path:
    """The 4,000 training digits as an image folder with captions (``images/*.png`` 32x32 grey and
    ``metadata.jsonl``: file name and one of the class's five prompts, in turn), written once under
    ``$SIDFLOW_CACHE`` (default ``~/.cache/sidflow``): SiDA reads them through the same path as any
    folder of real images. The 1,000 held-out digits are never written."""
    import json
    import os

    import numpy as np
    from PIL import Image

    from sidflow.atomic import atomic_dir
    from sidflow.digits.data import load_digits
    from sidflow.digits.text import PHRASINGS, prompt_for

    root = Path(os.environ.get("SIDFLOW_CACHE", Path.home() / ".cache" / "sidflow")) / f"{TRAIN_IMAGES}-v1"
    if (root / "metadata.jsonl").is_file():
        return root
    digits = load_digits("train")
    with atomic_dir(root) as tmp:
        (tmp / "images").mkdir()
        rows = []
        for i, (image, label) in enumerate(zip(digits.images, digits.labels.tolist(), strict=True)):
            pixels = ((image[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            name = f"images/{i:04d}.png"
            Image.fromarray(pixels, mode="L").save(tmp / name)
            rows.append({"file_name": name, "caption": prompt_for(label, i % len(PHRASINGS)), "label": label})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def register() -> None:
    """Plug the benchmark into the run layer (called once by :func:`sidflow.run.registry.load_plugins`)."""
    register_preset(DIGITS_PRESET, digits_preset(), replace=True)
    register_preset(DIGITS_LORA_PRESET, digits_lora_preset(), replace=True)
    register_evaluation("digits", _evaluation, replace=True)
    register_teacher_alias(BUNDLED, BUNDLED_TEACHER, replace=True)
    register_prompt_set("digits", digit_prompts, replace=True)
    register_image_set(TRAIN_IMAGES, training_digits_folder, replace=True)
