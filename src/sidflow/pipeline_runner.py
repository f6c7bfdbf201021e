"""``teacher.kind = "pipeline"``: distil a diffusers teacher (folder or hub id) end to end.

The run reads top to bottom: load the teacher through its adapter (:func:`sidflow.teachers.load_teacher`),
cache the prompt embeddings, build the three networks (frozen teacher, trainable fake score and
generator, spec 2), resume from the latest checkpoint if the run folder has one, then alternate the
two SiD phases (:class:`sidflow.trainer.SiDTrainer`) with a progress bar, periodic evaluation,
TensorBoard scalars and atomic checkpoints. The run folder ends with ``config.json``,
``metrics.json``, ``log.jsonl``, sample grids, a metric plot, ``report.md`` and the generator
exported as a stock diffusers pipeline (``generator_pipeline/``, spec 15).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sidflow.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sidflow.config import SiDConfig, to_dict
from sidflow.data import PromptSource, read_prompt_file
from sidflow.distributed import (
    DistContext,
    barrier,
    broadcast_module_,
    broadcast_object,
    init_from_env,
    reduce_metrics,
    shutdown,
)
from sidflow.errors import CheckpointError, ConfigError
from sidflow.evaluation import StudentEvaluation, make_evaluation, sample_student
from sidflow.trainer import SiDTrainer, generator_state_dict

__all__ = ["run_pipeline", "resolve_teacher_path", "resolve_prompts", "load_run_generator", "BUNDLED"]

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


def _resume(trainer: SiDTrainer, run_dir: Path, ctx: DistContext) -> None:
    """Every rank loads the checkpoint rank 0 found (the run folder must be shared by all nodes)."""
    ckpt = broadcast_object(latest_checkpoint(run_dir) if ctx.is_main else None)
    if ckpt is None:
        return
    if not Path(ckpt).is_dir():
        raise CheckpointError(f"rank {ctx.rank} cannot read {ckpt}; put the run folder on a file system "
                              "shared by every node")
    state, _ = load_checkpoint(ckpt, device=trainer.device)
    trainer.load_state_dict(state)
    if ctx.is_main:
        print(f"resumed from {ckpt} (iteration {trainer.iteration})")


def _save(trainer: SiDTrainer, run_dir: Path, config: SiDConfig) -> Path:
    return save_checkpoint(run_dir, trainer.iteration, trainer.state_dict(), to_dict(config))


def _ema_generator(trainer: SiDTrainer, scratch: torch.nn.Module | None) -> torch.nn.Module:
    """The generator to evaluate: the EMA weights (loaded into a scratch copy) when EMA is on."""
    if trainer.ema is None or scratch is None:
        return trainer.generator
    scratch.load_state_dict(generator_state_dict(trainer, ema=True))
    return scratch


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


def _build(config: SiDConfig, run_dir: Path, ctx: DistContext):
    """``(teacher, latent_shape, trainer)`` on this rank, resumed; networks identical on every rank."""
    teacher = load_run_teacher(config, ctx.device)
    latent_shape = teacher.latent_shape(config.data.resolution)
    source = _prompt_source(config, teacher, ctx.device, ctx)
    networks = teacher.make_denoisers(gradient_checkpointing=config.teacher.gradient_checkpointing == "on")
    for net in networks[1:]:   # before the trainer snapshots its EMA (DDP's sync_module_states)
        broadcast_module_(net)
    trainer = SiDTrainer(*networks, source, latent_shape, config, ctx.device, rank=ctx.rank,
                         world_size=ctx.world_size)
    _resume(trainer, run_dir, ctx)
    return teacher, latent_shape, trainer


def run_pipeline(config: SiDConfig, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Distil ``config.teacher.path`` with SiD; returns the metrics also written to ``metrics.json``.

    Under ``torchrun`` every rank trains its share of each global batch (:mod:`sidflow.distributed`);
    only rank 0 logs, evaluates, checkpoints and writes the report and the export. Other ranks return
    ``{"rank", "iterations", "images_seen", "train_seconds", "wall_seconds"}`` once rank 0 is done.
    """
    start = time.perf_counter()
    ctx = init_from_env()
    try:
        teacher, latent_shape, trainer = _build(config, run_dir, ctx)
        result = _train(config, run_dir, ctx, teacher, latent_shape, trainer, progress, start)
        barrier()   # the others return only once rank 0 has written metrics.json
    finally:
        shutdown(ctx)
    result["wall_seconds"] = time.perf_counter() - start
    if ctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


def _train(config: SiDConfig, run_dir: Path, ctx: DistContext, teacher, latent_shape, trainer: SiDTrainer,
           progress: bool, start: float) -> dict[str, Any]:
    """The training loop; rank 0 also evaluates, logs, checkpoints and finishes the run folder."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    main = ctx.is_main
    evaluation = make_evaluation(config, teacher, latent_shape, ctx.device) if main else None
    scratch = (copy.deepcopy(trainer.generator).requires_grad_(False)
               if trainer.ema is not None and main else None)
    total = config.train.num_steps()
    eval_every = (math.ceil(config.eval.every_kimg * 1000 / config.train.batch)
                  if config.eval.every_kimg > 0 else 0)
    log_path, history = run_dir / "log.jsonl", []
    writer = SummaryWriter(str(run_dir / "tensorboard")) if main else None
    if evaluation is not None and trainer.iteration == 0 and eval_every:
        history.append(evaluation.score_student(_ema_generator(trainer, scratch), trainer.images_seen))
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
        if evaluation is not None and eval_every and it % eval_every == 0 and it != total:
            row = evaluation.score_student(_ema_generator(trainer, scratch), trainer.images_seen)
            history.append(row)
            _log(writer, log_path, row)
            bar.write(evaluation.describe(row))
        if main and config.train.ckpt_every and it % config.train.ckpt_every == 0 and it != total:
            _save(trainer, run_dir, config)
    bar.close()
    result: dict[str, Any] = {"iterations": trainer.iteration, "images_seen": trainer.images_seen,
                              "train_seconds": train_seconds}
    if not main:
        return {"rank": ctx.rank, **result}
    ckpt = _save(trainer, run_dir, config)
    final_gen = _ema_generator(trainer, scratch)
    result.update(checkpoint=str(ckpt.relative_to(run_dir)), nonfinite_total=trainer.nonfinite_total,
                  world_size=ctx.world_size)
    if evaluation is not None:
        final = evaluation.score_student(final_gen, trainer.images_seen)
        history.append(final)
        _log(writer, log_path, final)
        result["final"], result["history"] = final, history
        result["teacher"] = evaluation.teacher_reference()
    writer.close()
    result["wall_seconds_before_report"] = time.perf_counter() - start
    from sidflow.run_report import finish_run  # lazy: matplotlib

    finish_run(run_dir, config, teacher, final_gen, latent_shape, evaluation, result)
    return result


def load_run_generator(run_dir: Path, device: torch.device | str | None = None, *, ema: bool = True):
    """``(config, teacher, generator, latent_shape)`` of a finished run (its latest checkpoint)."""
    from sidflow.config import from_json

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} has no config.json; pass the folder of a 'sidflow distill' run")
    config = from_json(cfg_path.read_text())
    device = torch.device(device) if device is not None else _device()
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; let 'sidflow distill' finish or resume it")
    teacher = load_run_teacher(config, device)
    generator = copy.deepcopy(teacher.denoiser).requires_grad_(False)
    state, _ = load_checkpoint(ckpt, device=device)
    prefix = "ema/" if ema and any(k.startswith("ema/") for k in state["tensors"]) else "generator/"
    weights = {k[len(prefix):]: v for k, v in state["tensors"].items() if k.startswith(prefix)}
    generator.load_state_dict({**generator.state_dict(), **weights})
    return config, teacher, generator, teacher.latent_shape(config.data.resolution)


def sample_run(run_dir: Path, prompts: list[str], *, steps: int | None = None, seed: int = 0
               ) -> Tensor:
    """Images ``[N, C, H, W]`` in [-1, 1] from a finished run's generator."""
    config, teacher, generator, latent_shape = load_run_generator(run_dir)
    latents = sample_student(generator, teacher.encode_prompts(prompts), latent_shape, config,
                             steps=steps or config.generator.num_steps, seed=seed, device=teacher.device)
    return teacher.decode_latents(latents)


__all__ += ["sample_run", "StudentEvaluation"]
