"""``teacher.kind = "pipeline"``: distil a diffusers teacher (folder or hub id) end to end.

The run reads top to bottom: load the teacher through its adapter (:func:`sidflow.teachers.load_teacher`),
cache the prompt embeddings, build the three networks (frozen teacher, trainable fake score and
generator, spec 2), resume from the latest checkpoint if the run folder has one, then alternate the
two SiD phases (:class:`sidflow.trainer.SiDTrainer`) with a progress bar, periodic evaluation,
TensorBoard scalars and atomic checkpoints. The run folder ends with ``config.json``,
``metrics.json``, ``log.jsonl``, sample grids, a metric plot, ``report.md`` and the generator
exported as a stock diffusers pipeline (``generator_pipeline/``, spec 15).

Under ``torchrun`` with ``train.sharding=fsdp2`` the three networks are FSDP2-sharded (spec 16):
rank 0 keeps the unsharded teacher and an unsharded scratch copy of the generator for evaluation and
export; before each evaluation every rank gathers the generator (EMA if on) into that copy, and
every checkpoint is gathered in full (to CPU) on rank 0; resuming re-shards it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sidflow.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_module_weights,
    save_checkpoint,
)
from sidflow.config import SiDConfig, to_dict
from sidflow.data import PromptSource, read_prompt_file
from sidflow.distributed import (
    DistContext,
    barrier,
    broadcast_module_,
    broadcast_object,
    fsdp_mesh,
    gather_into_,
    gather_state,
    init_from_env,
    reduce_metrics,
    shard_networks,
    shard_state_like,
    shutdown,
)
from sidflow.errors import CheckpointError, ConfigError
from sidflow.evaluation import make_evaluation, sample_student
from sidflow.selection import SnapshotSelector, snapshot_path
from sidflow.trainer import SiDTrainer, generator_state_dict

__all__ = ["run_pipeline", "resolve_teacher_path", "resolve_prompts", "load_run_generator", "load_run_weights",
           "sample_run", "BUNDLED"]

BUNDLED = "bundled"   # teacher.path naming the tiny SD3 teacher shipped in sidflow/assets/teacher
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_teacher_path(path: str) -> str:
    """``"bundled"`` -> the packaged teacher folder; anything else is a folder or hub id."""
    if path == BUNDLED:
        return str(Path(__file__).parent / "assets" / "teacher")
    if not path:
        raise ConfigError("teacher.path is empty; give a diffusers pipeline folder or hub id "
                          "(or 'bundled' for the tiny teacher shipped with sidflow)")
    return path


def resolve_prompts(spec: str) -> list[str]:
    """``data.prompts``: a text file (one prompt per line) or ``builtin:digits``."""
    if spec == "builtin:digits":
        from sidflow.embedded.text import PHRASINGS, prompt_for

        return [prompt_for(c, p) for c in range(10) for p in range(len(PHRASINGS))]
    if not spec:
        raise ConfigError("data.prompts is empty; give a prompt file (one prompt per line) or builtin:digits")
    return read_prompt_file(spec)


def load_run_teacher(config: SiDConfig, device: torch.device | str):
    """The teacher adapter of a run, loaded with the run's settings."""
    from sidflow.teachers import load_teacher  # lazy: diffusers import is slow

    tc = config.teacher
    return load_teacher(resolve_teacher_path(tc.path), time_scale=tc.time_scale, device=device,
                        dtype=_DTYPES[tc.dtype], max_sequence_length=tc.max_sequence_length)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resume(trainer: SiDTrainer, run_dir: Path, ctx: DistContext, sharded: bool) -> None:
    """Every rank loads the checkpoint rank 0 found (the run folder must be shared by all nodes)."""
    ckpt = broadcast_object(latest_checkpoint(run_dir) if ctx.is_main else None)
    if ckpt is None:
        return
    if not Path(ckpt).is_dir():
        raise CheckpointError(f"rank {ctx.rank} cannot read {ckpt}; put the run folder on a file system "
                              "shared by every node")
    # sharded: read the full checkpoint on the CPU; each tensor goes to the device as its shard
    state, _ = load_checkpoint(ckpt, device="cpu" if sharded else trainer.device)
    trainer.load_state_dict(shard_state_like(state, trainer) if sharded else state)
    if ctx.is_main:
        print(f"resumed from {ckpt} (iteration {trainer.iteration})")


def _save(trainer: SiDTrainer, run_dir: Path, config: SiDConfig, ctx: DistContext, sharded: bool
          ) -> Path | None:
    """Rank 0 writes a checkpoint (collective under FSDP2: every rank calls it); None elsewhere."""
    state = gather_state(trainer.state_dict(), device="cpu", rank0_only=True) if sharded else None
    if not ctx.is_main:
        return None
    return save_checkpoint(run_dir, trainer.iteration, state or trainer.state_dict(), to_dict(config))


def _eval_generator(trainer: SiDTrainer, scratch: torch.nn.Module | None, sharded: bool
                    ) -> torch.nn.Module | None:
    """The generator rank 0 evaluates and exports: the EMA weights when on, in the scratch copy.

    Under FSDP2 the (EMA) generator is gathered into rank 0's scratch copy, a collective every rank
    joins (the others get None).
    """
    if not sharded and (trainer.ema is None or scratch is None):
        return trainer.generator
    gather_into_(scratch, generator_state_dict(trainer, ema=True))
    return scratch


def use_fsdp2(config: SiDConfig, world_size: int) -> bool:
    """``train.sharding=fsdp2`` under torchrun; a single process runs unsharded (with a note)."""
    if config.train.sharding != "fsdp2":
        return False
    if world_size == 1:
        print("note: train.sharding=fsdp2 shards over torchrun ranks; one process runs unsharded")
        return False
    return True


def _shard(networks: tuple, ctx: DistContext) -> tuple[tuple, torch.nn.Module | None]:
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
    shard_networks(teacher, fake, generator, fsdp_mesh(ctx.device))
    if ctx.is_main:
        print(f"train.sharding=fsdp2: networks sharded over {ctx.world_size} ranks")
    return (teacher, fake, generator), scratch


def _log(writer, log_path: Path, row: dict[str, Any]) -> None:
    with log_path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("iteration", "images_seen"):
                writer.add_scalar(key, value, row["images_seen"])


def _prompt_source(config: SiDConfig, teacher, device: torch.device, ctx: DistContext) -> PromptSource:
    """The cached prompt source; with an on-disk cache rank 0 fills it first and the others read it."""
    def build() -> PromptSource:
        source = PromptSource(resolve_prompts(config.data.prompts), teacher, cache_size=config.data.cache_size,
                              cache_dir=config.data.cache_dir)
        # Text encoders leave the compute device only when every prompt is cached (data.py).
        source.precompute(offload=device.type == "cuda")
        return source

    if config.data.cache_dir is None or ctx.world_size == 1:
        return build()
    source = build() if ctx.is_main else None
    barrier()
    return source if source is not None else build()


@dataclass
class _Run:
    """What one rank trains with: the teacher adapter, the trainer and rank 0's scratch generator."""

    teacher: Any
    latent_shape: tuple[int, ...]
    trainer: SiDTrainer
    scratch: torch.nn.Module | None
    sharded: bool


def _build(config: SiDConfig, run_dir: Path, ctx: DistContext, sharded: bool) -> _Run:
    """This rank's networks and trainer, resumed; identical on every rank (up to FSDP2 shards).

    The scratch generator (rank 0 only) receives the weights to evaluate: EMA ones, or under FSDP2
    the gathered ones.
    """
    teacher = load_run_teacher(config, ctx.device)
    latent_shape = teacher.latent_shape(config.data.resolution)
    source = _prompt_source(config, teacher, ctx.device, ctx)
    networks = teacher.make_denoisers(gradient_checkpointing=config.teacher.gradient_checkpointing == "on")
    for net in networks[1:]:   # before the trainer snapshots its EMA (DDP's sync_module_states)
        broadcast_module_(net)
    scratch = None
    if sharded:
        networks, scratch = _shard(networks, ctx)
    elif config.train.ema_halflife_kimg > 0 and ctx.is_main:
        scratch = copy.deepcopy(networks[2]).requires_grad_(False)
    trainer = SiDTrainer(*networks, source, latent_shape, config, ctx.device, rank=ctx.rank,
                         world_size=ctx.world_size)
    _resume(trainer, run_dir, ctx, sharded)
    return _Run(teacher, latent_shape, trainer, scratch, sharded)


def run_pipeline(config: SiDConfig, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Distil ``config.teacher.path`` with SiD; returns the metrics also written to ``metrics.json``.

    Under ``torchrun`` every rank trains its share of each global batch (:mod:`sidflow.distributed`);
    only rank 0 logs, evaluates, checkpoints and writes the report and the export. Other ranks return
    ``{"rank", "iterations", "images_seen", "train_seconds", "wall_seconds"}`` once rank 0 is done.
    """
    start = time.perf_counter()
    ctx = init_from_env()
    try:
        run = _build(config, run_dir, ctx, use_fsdp2(config, ctx.world_size))
        result = _train(config, run_dir, ctx, run, progress, start)
        barrier()   # the others return only once rank 0 has written metrics.json
    finally:
        shutdown(ctx)
    result["wall_seconds"] = time.perf_counter() - start
    if ctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


def _train(config: SiDConfig, run_dir: Path, ctx: DistContext, run: _Run, progress: bool, start: float
           ) -> dict[str, Any]:
    """The training loop; rank 0 also evaluates, logs, checkpoints and finishes the run folder.

    Evaluation points are decided from the config alone, so under FSDP2 every rank joins the
    generator gather of each one (and of each checkpoint) while only rank 0 scores and writes.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    main, trainer = ctx.is_main, run.trainer
    evaluation = make_evaluation(config, run.teacher, run.latent_shape, ctx.device) if main else None
    total = config.train.num_steps()
    eval_every = (math.ceil(config.eval.every_kimg * 1000 / config.train.batch)
                  if config.eval.every_kimg > 0 and config.eval.kind != "none" else 0)
    log_path, history = run_dir / "log.jsonl", []
    writer = SummaryWriter(str(run_dir / "tensorboard")) if main else None
    selector = (SnapshotSelector(run_dir, config.eval.student_steps, to_dict(config),
                                 per_steps=config.eval.select == "validation_per_steps")
                if main and evaluation is not None and config.eval.select != "final" else None)
    if eval_every and trainer.iteration == 0:
        student = _eval_generator(trainer, run.scratch, run.sharded)
        if main:
            history.append(evaluation.score_student(student, trainer.images_seen))
    bar = tqdm(total=total, initial=trainer.iteration, desc="SiD", unit="it", disable=not (progress and main),
               dynamic_ncols=True)
    train_seconds = 0.0
    while trainer.iteration < total:
        tick = time.perf_counter()
        metrics = reduce_metrics(trainer.step())
        train_seconds += time.perf_counter() - tick
        bar.update(1)
        bar.set_postfix(fake=f"{metrics['loss_fake']:.4g}", gen=f"{metrics['loss_gen']:.4g}",
                        k=metrics["k"], img_s=f"{metrics['images_per_s']:.1f}")
        it = trainer.iteration
        if main and (it % config.train.log_every == 0 or it == total):
            _log(writer, log_path, metrics)
        if eval_every and it % eval_every == 0 and it != total:
            student = _eval_generator(trainer, run.scratch, run.sharded)
            if main:
                row = evaluation.score_student(student, trainer.images_seen)
                history.append(row)
                _log(writer, log_path, row)
                kept = selector.offer(row, student) if selector is not None else []
                bar.write(evaluation.describe(row) + _kept_note(kept, selector))
        if config.train.ckpt_every and it % config.train.ckpt_every == 0 and it != total:
            _save(trainer, run_dir, config, ctx, run.sharded)
    bar.close()
    result: dict[str, Any] = {"iterations": trainer.iteration, "images_seen": trainer.images_seen,
                              "train_seconds": train_seconds}
    ckpt = _save(trainer, run_dir, config, ctx, run.sharded)
    final_gen = _eval_generator(trainer, run.scratch, run.sharded)
    if not main:
        return {"rank": ctx.rank, **result}
    result.update(checkpoint=str(ckpt.relative_to(run_dir)), nonfinite_total=trainer.nonfinite_total,
                  world_size=ctx.world_size, sharding="fsdp2" if run.sharded else "none")
    generators = None
    if evaluation is not None:
        final = evaluation.score_student(final_gen, trainer.images_seen)
        history.append(final)
        _log(writer, log_path, final)
        result["final"], result["history"] = final, history
        if selector is not None:
            selector.offer(final, final_gen)
        if selector is not None and selector.kept:
            # report, grid and export the snapshots the run chose on validation
            generators = _selected_generators(selector, final, final_gen, config.eval.student_steps)
            reported = _reported_row(selector, final, config.eval.student_steps)
            if reported != final:
                result["final"], result["last"] = reported, final
            final_gen = generators[max(generators)]
            result["selected"] = _selected_info(selector, run_dir, config.eval.student_steps)
        result["teacher"] = evaluation.teacher_reference()
    writer.close()
    result["wall_seconds_before_report"] = time.perf_counter() - start
    from sidflow.run_report import finish_run  # lazy: matplotlib

    finish_run(run_dir, config, run.teacher, final_gen, run.latent_shape, evaluation, result,
               generators=generators)
    return result


def _kept_note(won: list[tuple[int, ...]], selector: SnapshotSelector | None) -> str:
    if not won:
        return ""
    if selector is None or not selector.per_steps:
        return " (best on validation so far)"
    return f" (best on validation so far at {', '.join(str(s[0]) for s in won)} steps)"


def _selected_generators(selector: SnapshotSelector, final: dict[str, Any], final_gen, steps: tuple[int, ...]
                         ) -> dict[int, Any]:
    """The generator kept for each step count (the final one where it won or where nothing was kept,
    e.g. all its validation FIDs non-finite; one load per snapshot)."""
    loaded: dict[int, Any] = {final["images_seen"]: final_gen}
    out = {}
    for k in steps:
        seen = (selector.row_for(k) or final)["images_seen"]
        if seen not in loaded:
            loaded[seen] = selector.load_into(copy.deepcopy(final_gen), k)
        out[k] = loaded[seen]
    return out


def _reported_row(selector: SnapshotSelector, final: dict[str, Any], steps: tuple[int, ...]) -> dict[str, Any]:
    """One evaluation row with each step count's figures taken from the snapshot kept for it (the
    final row where none was kept); ``images_seen`` is that of the largest step count's snapshot."""
    main = selector.row_for(max(steps)) or final
    if not selector.per_steps:
        return main
    row = {"images_seen": main["images_seen"]}
    for k in steps:
        kept = selector.row_for(k) or final
        row.update({key: v for key, v in kept.items() if key.endswith(f"_{k}step")})
        row[f"images_seen_{k}step"] = kept["images_seen"]
    return row


def _selected_info(selector: SnapshotSelector, run_dir: Path, steps: tuple[int, ...]) -> dict[str, Any]:
    """Which snapshots were kept (step counts whose criterion kept none are left out)."""
    kept = {k: selector.row_for(k) for k in steps if selector.row_for(k) is not None}
    main = max(kept)
    info: dict[str, Any] = {"images_seen": kept[main]["images_seen"],
                            "path": str(selector.path_for(main).relative_to(run_dir)), "rule": selector.rule()}
    if selector.per_steps:
        info["by_steps"] = {str(k): {"images_seen": row["images_seen"],
                                     "path": str(selector.path_for(k).relative_to(run_dir))} for k, row in kept.items()}
    return info


def load_run_generator(run_dir: Path, device: torch.device | str | None = None, *, ema: bool = True,
                       steps: int | None = None):
    """``(config, teacher, generator, latent_shape)`` of a finished run.

    The weights are the snapshot the run selected on validation for ``steps`` generator steps
    (``selected/``, or ``selected/{k}step/`` of the nearest evaluated k; None = the largest; when it
    kept one and ``ema`` is on), else those of its latest checkpoint (EMA when ``ema`` and the run
    kept one).
    """
    from sidflow.config import from_json

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} has no config.json; pass the folder of a 'sidflow distill' run")
    config = from_json(cfg_path.read_text())
    device = torch.device(device) if device is not None else _device()
    teacher = load_run_teacher(config, device)
    generator = load_run_weights(run_dir, copy.deepcopy(teacher.denoiser).requires_grad_(False),
                                 steps=steps, ema=ema)
    return config, teacher, generator, teacher.latent_shape(config.data.resolution)


def load_run_weights(run_dir: Path, generator, *, steps: int | None = None, ema: bool = True):
    """Load into ``generator`` (in place; returned) the weights :func:`load_run_generator` picks for
    ``steps`` generator steps, without loading the teacher again."""
    run_dir = Path(run_dir)
    ckpt = (snapshot_path(run_dir, steps) if ema else None) or latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; let 'sidflow distill' finish or resume it")
    state, _ = load_checkpoint(ckpt, device=next(generator.parameters()).device)
    prefix = "ema/" if ema and any(k.startswith("ema/") for k in state["tensors"]) else "generator/"
    return load_module_weights(generator, state["tensors"], prefix)


def sample_run(run_dir: Path, prompts: list[str], *, steps: int | None = None, seed: int = 0
               ) -> Tensor:
    """Images ``[N, C, H, W]`` in [-1, 1] from a finished run's generator."""
    config, teacher, generator, latent_shape = load_run_generator(run_dir, steps=steps)
    latents = sample_student(generator, teacher.encode_prompts(prompts), latent_shape, config,
                             steps=steps or config.generator.num_steps, seed=seed, device=teacher.device)
    return teacher.decode_latents(latents)

