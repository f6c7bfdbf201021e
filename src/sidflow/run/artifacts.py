"""Using a finished (or checkpointed) run: its generator, its weights, its samples.

The weights are the snapshot the run selected on validation for the requested step count
(``selected/``, or ``selected/{k}step/`` of the nearest evaluated k; spec 9) when it kept one, else
those of its newest checkpoint (EMA weights when the run kept them).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from sidflow.config import SiDConfig, from_json
from sidflow.core.denoiser import Denoiser
from sidflow.core.generator import generate, generator_step_times
from sidflow.core.guidance import with_embedded_guidance
from sidflow.errors import ConfigError
from sidflow.run.build import load_run_teacher
from sidflow.run.checkpoint import latest_checkpoint, read_generator, read_network
from sidflow.run.selection import snapshot_path
from sidflow.teachers.lora import lora_spec

__all__ = ["load_run_generator", "load_run_weights", "sample_run"]


def load_run_generator(
    run_dir: Path, device: torch.device | str | None = None, *, ema: bool = True, steps: int | None = None
) -> tuple[SiDConfig, Any, nn.Module, tuple[int, ...]]:
    """``(config, teacher, generator, latent_shape)`` of a finished run.

    Args:
        run_dir: the folder of a ``sidflow distill`` run.
        device: where to load (default: CUDA when available).
        ema: use the EMA weights / the selected snapshot when the run has them.
        steps: the generator step count the weights are for (None: the largest evaluated).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} has no config.json; pass the folder of a 'sidflow distill' run")
    config = from_json(cfg_path.read_text())
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_run_teacher(config, device)
    lora = lora_spec(config.lora, teacher.denoiser.lora_targets)
    # LoRA runs: the generator adapter on the teacher's own transformer (the teacher view stays the base)
    shared = dataclasses.replace(lora, share_base=True) if lora is not None else None  # sampling: no copies
    network = teacher.make_denoisers(lora=shared)[2] if shared is not None else copy.deepcopy(teacher.denoiser)
    generator = load_run_weights(run_dir, network.requires_grad_(False).eval(), steps=steps, ema=ema)
    return config, teacher, generator, teacher.latent_shape(config.data.resolution)


def load_run_weights(run_dir: Path, generator: nn.Module, *, steps: int | None = None, ema: bool = True) -> nn.Module:
    """Load into ``generator`` (in place; returned) the weights :func:`load_run_generator` picks for
    ``steps`` generator steps, without loading the teacher again and without reading any optimiser
    state."""
    run_dir = Path(run_dir)
    ckpt = (snapshot_path(run_dir, steps) if ema else None) or latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; let 'sidflow distill' finish or resume it")
    device = next(generator.parameters()).device
    weights = read_generator(ckpt, device) if ema else read_network(ckpt, "generator", device)
    generator.load_state_dict({**generator.state_dict(), **weights})
    return generator


def sample_run(run_dir: Path, prompts: list[str], *, steps: int | None = None, seed: int = 0) -> Tensor:
    """Images ``[N, C, H, W]`` in [-1, 1] from a finished run's generator (keyed noise: sample ``i``
    gets the same image whatever the batch)."""
    config, teacher, generator, latent_shape = load_run_generator(run_dir, steps=steps)
    gc = config.generator
    cond = with_embedded_guidance(teacher.encode_prompts(prompts), config.guidance.embedded_generator)
    latents = generate(
        cast(Denoiser, generator),  # a Denoiser module (a copy of the teacher's)
        cond,
        latent_shape,
        steps=steps or gc.num_steps,
        step_times=generator_step_times(gc.num_steps, gc.t_init, gc.shift),
        noise_type=gc.noise_type,
        seed=seed,
        batch=250,
        device=teacher.device,
    )
    return teacher.decode_latents(latents)
