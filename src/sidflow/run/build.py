"""Building a run: the teacher adapter, the prompt source, the three networks, sharding, resume.

Spec 2: frozen teacher psi, trainable fake score phi and generator theta, the latter two copies of
the teacher. Every rank builds the same networks (rank 0's weights are broadcast, DDP's
``sync_module_states``); under ``train.sharding=fsdp2`` they are then sharded (spec 16) and rank 0
keeps an unsharded teacher for the report's grids and a frozen scratch copy of the generator into
which the (EMA) weights are gathered for evaluation and export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sidflow.collectives import barrier, broadcast_module_
from sidflow.config import SiDConfig
from sidflow.data.prompts import PromptSource
from sidflow.optim import resolve_precision
from sidflow.run.checkpoint import resume_trainer
from sidflow.run.distributed import DistContext, fsdp_mesh, gather_into_, shard_networks
from sidflow.run.registry import resolve_prompts, resolve_teacher_path
from sidflow.trainer import SiDTrainer, generator_state_dict

if TYPE_CHECKING:
    from sidflow.teachers.base import TransformerDenoiser

__all__ = ["RunState", "build_run", "load_run_teacher", "use_fsdp2", "eval_generator", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunState:
    """What one rank trains with: the teacher adapter, the trainer and rank 0's scratch generator."""

    teacher: Any
    latent_shape: tuple[int, ...]
    trainer: SiDTrainer
    scratch: nn.Module | None
    sharded: bool


def load_run_teacher(config: SiDConfig, device: torch.device | str) -> Any:
    """The teacher adapter of a run, loaded with the run's settings (in bf16 under pure_bf16)."""
    from sidflow.teachers import load_teacher  # lazy: the diffusers import is slow

    tc = config.teacher
    pure = resolve_precision(config.train.precision, device) == "pure_bf16"
    return load_teacher(
        resolve_teacher_path(tc.path),
        time_scale=tc.time_scale,
        device=device,
        dtype=torch.bfloat16 if pure else DTYPES[tc.dtype],
        max_sequence_length=tc.max_sequence_length,
    )


def use_fsdp2(config: SiDConfig, world_size: int) -> bool:
    """``train.sharding=fsdp2`` under torchrun; a single process runs unsharded (with a note)."""
    if config.train.sharding != "fsdp2":
        return False
    if world_size == 1:
        print("note: train.sharding=fsdp2 shards over torchrun ranks; one process runs unsharded")
        return False
    return True


def _prompt_source(config: SiDConfig, teacher: Any, ctx: DistContext) -> PromptSource:
    """The cached prompt source; with an on-disk cache rank 0 fills it first and the others read it."""

    def build() -> PromptSource:
        source = PromptSource(
            resolve_prompts(config.data.prompts),
            teacher,
            cache_size=config.data.cache_size,
            cache_dir=config.data.cache_dir,
        )
        # Text encoders leave the compute device only when every prompt is cached (sidflow.data.prompts).
        source.precompute(offload=ctx.device.type == "cuda")
        return source

    if config.data.cache_dir is None or ctx.world_size == 1:
        return build()
    source = build() if ctx.is_main else None
    barrier()
    return source if source is not None else build()


def _shard(
    networks: tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser], ctx: DistContext, precision: str
) -> tuple[tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser], nn.Module | None]:
    """FSDP2-shard ``(teacher, fake, generator)``; rank 0 keeps unsharded teacher and generator copies.

    Rank 0 shards a copy of the teacher (the adapter's own denoiser stays whole for the teacher
    grids of the report) and returns a frozen scratch copy of the generator; other ranks shard the
    teacher in place and get no scratch.
    """
    teacher, fake, generator = networks
    scratch = None
    if ctx.is_main:
        scratch = copy.deepcopy(generator).requires_grad_(False)
        teacher = copy.deepcopy(teacher)
    shard_networks(teacher, fake, generator, fsdp_mesh(ctx.device), bf16_params=precision == "amp_bf16")
    if ctx.is_main:
        print(f"train.sharding=fsdp2: networks sharded over {ctx.world_size} ranks")
    return (teacher, fake, generator), scratch


def build_run(config: SiDConfig, run_dir: Path, ctx: DistContext) -> RunState:
    """This rank's networks and trainer, resumed from the run folder's newest checkpoint if any."""
    sharded = use_fsdp2(config, ctx.world_size)
    teacher = load_run_teacher(config, ctx.device)
    latent_shape = teacher.latent_shape(config.data.resolution)
    source = _prompt_source(config, teacher, ctx)
    precision = resolve_precision(config.train.precision, ctx.device)
    if precision == "amp_bf16" and ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32 (spec 6.3)
        torch.backends.cudnn.allow_tf32 = True
    networks: tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser] = teacher.make_denoisers(
        gradient_checkpointing=config.teacher.gradient_checkpointing == "on", precision=precision
    )
    for net in networks[1:]:  # before the trainer snapshots its EMA (DDP's sync_module_states)
        broadcast_module_(net)
    scratch = None
    if sharded:
        networks, scratch = _shard(networks, ctx, precision)
    elif config.train.ema_halflife_kimg > 0 and ctx.is_main:
        scratch = copy.deepcopy(networks[2]).requires_grad_(False)
    trainer = SiDTrainer(*networks, source, latent_shape, config, ctx.device, rank=ctx.rank, world_size=ctx.world_size)
    ckpt = resume_trainer(trainer, run_dir, rank=ctx.rank, sharded=sharded)
    if ckpt is not None and ctx.is_main:
        print(f"resumed from {ckpt} (iteration {trainer.iteration})")
    return RunState(teacher, latent_shape, trainer, scratch, sharded)


def eval_generator(run: RunState) -> nn.Module | None:
    """The generator rank 0 evaluates and exports: the EMA weights when on, in the scratch copy.

    Under FSDP2 the (EMA) generator is gathered into rank 0's scratch copy, a collective every rank
    joins (the others get None).
    """
    trainer = run.trainer
    if not run.sharded and (trainer.ema is None or run.scratch is None):
        return trainer.generator  # type: ignore[return-value]
    gather_into_(run.scratch, generator_state_dict(trainer, ema=True))
    return run.scratch
