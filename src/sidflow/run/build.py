"""Building a run: the teacher adapter, the prompt source, the three networks, sharding, resume.

Spec 2: frozen teacher psi, trainable fake score phi and generator theta, the latter two copies of
the teacher. Unsharded, every rank builds the same networks (rank 0's weights are broadcast, DDP's
``sync_module_states``) and rank 0 keeps a frozen scratch copy of the generator for the EMA
weights. Under ``train.sharding=fsdp2`` the networks are built shard first (spec 16,
:mod:`sidflow.run.sharded`): only rank 0 reads the teacher's transformer weights, into host memory,
and every rank allocates only its shards; the generator that rank 0 evaluates and exports is
gathered on demand (:func:`eval_generator`) and the host copy of the teacher goes to the device
only for the report's teacher grids, once training is over (:func:`teacher_for_report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from sidflow.collectives import broadcast_module_
from sidflow.config import SiDConfig
from sidflow.data.prompts import PromptSource
from sidflow.optim import resolve_precision
from sidflow.run.checkpoint import init_trainer, resume_trainer
from sidflow.run.distributed import DistContext, fsdp_mesh
from sidflow.run.registry import evaluates_on_all_ranks, resolve_image_source, resolve_prompts, resolve_teacher_path
from sidflow.run.sharded import build_sharded_networks, gathered_generator
from sidflow.teachers.lora import LoraSpec, copy_sharing_base, lora_spec
from sidflow.trainer import SiDTrainer, generator_state_dict

if TYPE_CHECKING:
    from sidflow.teachers.base import TransformerDenoiser

__all__ = ["RunState", "build_run", "load_run_teacher", "use_fsdp2", "eval_generator", "teacher_for_report", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunState:
    """What one rank trains with: the teacher adapter, the trainer and the scratch generator of the
    ranks that evaluate (rank 0; every rank when the evaluation shares its samples: ``eval_all_ranks``)."""

    teacher: Any
    latent_shape: tuple[int, ...]
    trainer: SiDTrainer
    scratch: nn.Module | None
    sharded: bool
    lora: LoraSpec | None = None
    eval_all_ranks: bool = False
    eval_prompts: PromptSource | None = None  # eval.kind=t2i: its prompts' cached embeddings

    @property
    def evaluates(self) -> bool:
        """Whether this rank evaluates (and so needs an evaluation generator)."""
        return self.trainer.rank == 0 or self.eval_all_ranks


def load_run_teacher(config: SiDConfig, device: torch.device | str, transformer_device: str | None = None) -> Any:
    """The teacher adapter of a run, loaded with the run's settings (in bf16 under pure_bf16);
    ``transformer_device`` as :func:`~sidflow.teachers.load_teacher` (shard-first FSDP2)."""
    from sidflow.teachers import load_teacher, teacher_load_options  # lazy: the diffusers import is slow

    tc = config.teacher
    pure = resolve_precision(config.train.precision, device) == "pure_bf16"
    return load_teacher(
        resolve_teacher_path(tc.path),
        time_scale=tc.time_scale,
        device=device,
        dtype=torch.bfloat16 if pure else DTYPES[tc.dtype],
        max_sequence_length=tc.max_sequence_length,
        transformer_device=transformer_device,
        **teacher_load_options(tc),  # text-encoder precision, hub revision/variant/token (issue 15)
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
    """The cached prompt source. With an on-disk cache every rank encodes a disjoint share of the
    missing prompts, then all meet at a barrier and read each other's shards
    (:meth:`~sidflow.data.prompts.PromptSource.precompute`); without one each rank fills its own LRU."""
    source = PromptSource(
        resolve_prompts(config.data.prompts, config.data.prompt_column),
        teacher,
        cache_size=config.data.cache_size,
        cache_dir=config.data.cache_dir,
    )
    source.precompute(share=(ctx.rank, ctx.world_size))
    return source


def _sources(config: SiDConfig, teacher: Any, ctx: DistContext) -> tuple[PromptSource, Any]:
    """``(the generator's prompt source, SiDA's real source or None)``. In SiDA mode both come from
    ``data.real`` (spec 7, 8): its images' latents encoded once and cached, and its captions as the
    generator's prompts (``data.prompts`` is not read)."""
    if config.gan.mode != "sida":
        return _prompt_source(config, teacher, ctx), None
    from sidflow.data.real_images import RealImageSource, read_image_table

    dc = config.data
    table = read_image_table(
        resolve_image_source(dc.real), image_column=dc.real_image_column, caption_column=dc.real_caption_column
    )
    real = RealImageSource(table, teacher, resolution=dc.resolution, cache_dir=dc.cache_dir, cache_size=dc.cache_size)
    skipped = real.precompute(share=(ctx.rank, ctx.world_size))
    if ctx.is_main:
        note = f"; {skipped} unreadable images skipped" if skipped else ""
        print(f"data.real: {len(real)} images with captions from {table.where}{note}; their captions are the prompts")
    prompts = cast(PromptSource, real.prompts)
    prompts.precompute(share=(ctx.rank, ctx.world_size))
    return prompts, real


def _eval_prompt_source(config: SiDConfig, teacher: Any, ctx: DistContext) -> PromptSource | None:
    """``eval.kind=t2i``: its reported and validation prompts through the run's embedding caches,
    encoded now, while the text encoders are still on the compute device."""
    ec = config.eval
    if ec.kind != "t2i" or not ec.prompts:
        return None
    prompts = resolve_prompts(ec.prompts, ec.prompt_column)[: ec.num_samples]
    if ec.val_prompts:
        prompts += resolve_prompts(ec.val_prompts, ec.prompt_column)[: ec.val_samples]
    dc = config.data
    source = PromptSource(prompts, teacher, cache_size=min(len(prompts), dc.cache_size), cache_dir=dc.cache_dir)
    source.precompute(share=(ctx.rank, ctx.world_size))
    return source


def build_run(config: SiDConfig, run_dir: Path, ctx: DistContext) -> RunState:
    """This rank's networks and trainer, resumed from the run folder's newest checkpoint if any."""
    sharded = use_fsdp2(config, ctx.world_size)
    eval_all_ranks = evaluates_on_all_ranks(config)
    # shard first: rank 0 reads the transformer's weights into host memory, the others build it on meta
    teacher = load_run_teacher(config, ctx.device, ("cpu" if ctx.is_main else "meta") if sharded else None)
    latent_shape = teacher.latent_shape(config.data.resolution)
    source, real = _sources(config, teacher, ctx)
    eval_prompts = _eval_prompt_source(config, teacher, ctx)
    # the text encoders leave the GPU only when every prompt (training and evaluation) is cached
    if ctx.device.type == "cuda" and all(s.fully_cached() for s in (source, eval_prompts) if s is not None):
        teacher.move_text_encoders("cpu")
    precision = resolve_precision(config.train.precision, ctx.device)
    if precision == "amp_bf16" and ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32 (spec 6.3)
        torch.backends.cudnn.allow_tf32 = True
    checkpointing = config.teacher.gradient_checkpointing == "on"
    lora = lora_spec(config.lora, teacher.denoiser.lora_targets)
    networks: tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser]
    scratch = None
    if sharded:
        networks = build_sharded_networks(
            teacher.denoiser,
            fsdp_mesh(ctx.device),
            ctx.device,
            precision=precision,
            gradient_checkpointing=checkpointing,
            reshard_after_forward=config.train.reshard_after_forward == "on",
            cpu_offload=config.train.cpu_offload == "on",
            lora=lora,
            seed=config.train.seed,
        )
        if ctx.is_main:
            print(f"train.sharding=fsdp2: networks built shard first and sharded over {ctx.world_size} ranks")
    else:
        networks = teacher.make_denoisers(
            gradient_checkpointing=checkpointing, precision=precision, lora=lora, seed=config.train.seed
        )
        for net in networks[1:]:  # before the trainer snapshots its EMA (DDP's sync_module_states)
            broadcast_module_(net)
        if config.train.ema_halflife_kimg > 0 and (ctx.is_main or eval_all_ranks):
            scratch = copy_sharing_base(networks[2]).requires_grad_(False)  # LoRA: the base is shared
    trainer = SiDTrainer(
        *networks, source, latent_shape, config, ctx.device, rank=ctx.rank, world_size=ctx.world_size, real_source=real
    )
    ckpt = resume_trainer(trainer, run_dir, rank=ctx.rank, sharded=sharded)
    if ckpt is not None and ctx.is_main:
        print(f"resumed from {ckpt} (iteration {trainer.iteration})")
    elif ckpt is None and config.train.init_from:
        tc = config.train
        start = init_trainer(
            trainer,
            Path(tc.init_from),
            rank=ctx.rank,
            sharded=sharded,
            generator=tc.init_generator,
            optimizers=tc.init_optimizers == "on",
        )
        if ctx.is_main:
            print(f"train.init_from: fake score and generator ({tc.init_generator}) from {start}")
    return RunState(teacher, latent_shape, trainer, scratch, sharded, lora, eval_all_ranks, eval_prompts)


def eval_generator(run: RunState) -> nn.Module | None:
    """The generator an evaluating rank (:attr:`RunState.evaluates`) scores and rank 0 exports: the
    EMA weights when on, in the scratch copy; None on the other ranks.

    Under FSDP2 the (EMA) generator is gathered on demand into a fresh unsharded copy on each
    evaluating rank (:func:`~sidflow.run.sharded.gathered_generator`), a collective every rank joins;
    the caller drops it when done.
    """
    trainer = run.trainer
    if run.sharded:
        return gathered_generator(trainer, run.teacher.denoiser if run.evaluates else None, ema=True, lora=run.lora)
    if not run.evaluates:
        return None
    if trainer.ema is None or run.scratch is None:
        return trainer.generator  # type: ignore[return-value]
    with torch.no_grad():
        run.scratch.load_state_dict(generator_state_dict(trainer, ema=True))
    return run.scratch


def eval_teacher(run: RunState) -> nn.Module | None:
    """The frozen teacher for an evaluation's teacher reference on an evaluating rank: the teacher's
    own network, or under FSDP2 a gathered copy of it (collective; the caller drops it when done)."""
    if run.sharded:
        template = run.teacher.denoiser if run.evaluates else None
        return gathered_generator(run.trainer, template, ema=False, lora=run.lora, teacher=True)
    return run.trainer.teacher if run.evaluates else None  # type: ignore[return-value]


def release_optimizer_state(run: RunState) -> None:
    """Free both optimizers' state once the last checkpoint is written (FSDP2 runs: every rank frees
    its shards of it), before rank 0 gathers the generator and moves the teacher for the report."""
    if run.sharded:
        for opt in (run.trainer.opt_fake, run.trainer.opt_gen):
            opt.state.clear()


def teacher_for_report(run: RunState, device: torch.device) -> Any:
    """The teacher adapter, ready for the report's teacher grids once training is over.

    Under FSDP2 rank 0's teacher weights sit in host memory during training; they move to the device
    now, in bf16 with bf16 autocast under ``amp_bf16``, as the frozen teacher trained
    (:func:`~sidflow.teachers.base.configure_networks`).
    """
    if run.sharded:
        denoiser = run.teacher.denoiser
        if run.trainer.precision == "amp_bf16":
            denoiser.autocast_dtype = torch.bfloat16
            denoiser.to(device, torch.bfloat16)
        else:
            denoiser.to(device)
    return run.teacher
