"""``teacher.kind = "pipeline"``: distil a diffusers teacher (folder or hub id) end to end.

The run reads top to bottom (:func:`run_pipeline`): join the torchrun job; build the networks and
the trainer, resumed if the run folder has a checkpoint (:mod:`sidflow.run.build`); then alternate
the two SiD phases (:meth:`sidflow.trainer.SiDTrainer.step`) with periodic evaluation and snapshot
selection (:mod:`sidflow.run.selection`), logging (:mod:`sidflow.run.logging`) and atomic
checkpoints (:mod:`sidflow.run.checkpoint`); finally score the last weights, and write the report,
the grids and the generator exported as a stock diffusers pipeline (:mod:`sidflow.run.report`).

Under ``torchrun`` every rank trains its share of each global batch; only rank 0 logs, evaluates,
checkpoints and writes. Evaluation, checkpoint and log points are decided from the config alone,
so under FSDP2 every rank joins each generator gather and each checkpoint gather, and every rank
joins the loss average at each log point. The host reads the training metrics only at log points.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, cast

from sidflow.atomic import atomic_file
from sidflow.collectives import barrier, mean_over_ranks
from sidflow.config import SiDConfig, to_dict
from sidflow.core.denoiser import Denoiser
from sidflow.run.build import (
    RunState,
    build_run,
    eval_generator,
    eval_teacher,
    release_optimizer_state,
    teacher_for_report,
)
from sidflow.run.checkpoint import save_trainer
from sidflow.run.distributed import DistContext, init_from_env, shutdown
from sidflow.run.logging import RunLogger
from sidflow.run.registry import make_evaluation, validate
from sidflow.run.selection import SnapshotSelector, kept_note, reported_row, selected_generators, selected_info

__all__ = ["run_pipeline", "eval_interval"]


def eval_interval(config: SiDConfig) -> int:
    """Iterations between evaluations (0: only at the end, or no evaluation)."""
    if config.eval.every_kimg <= 0 or config.eval.kind == "none":
        return 0
    return math.ceil(config.eval.every_kimg * 1000 / config.train.batch)


def run_pipeline(config: SiDConfig, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Distil ``config.teacher.path`` with SiD; returns the metrics also written to ``metrics.json``.

    Other ranks than 0 return ``{"rank", "iterations", "images_seen", "train_seconds",
    "wall_seconds"}`` once rank 0 is done.
    """
    start = time.perf_counter()
    validate(config)  # an unknown eval.kind fails here, not after the teacher is loaded
    ctx = init_from_env()
    try:
        run = build_run(config, run_dir, ctx)
        result = _train(config, run_dir, ctx, run, progress, start)
        result["wall_seconds"] = time.perf_counter() - start
        if ctx.is_main:
            with atomic_file(run_dir / "metrics.json") as tmp:
                tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
        barrier()  # the others return only once rank 0 has written metrics.json
    finally:
        shutdown(ctx)
    return result


def _train(
    config: SiDConfig, run_dir: Path, ctx: DistContext, run: RunState, progress: bool, start: float
) -> dict[str, Any]:
    main, trainer, tc = ctx.is_main, run.trainer, config.train
    evaluation = (
        make_evaluation(
            config,
            run.teacher,
            run.latent_shape,
            ctx.device,
            prompt_source=run.eval_prompts,
            teacher_precision=trainer.precision,
        )
        if run.evaluates
        else None
    )
    if evaluation is not None and run.eval_all_ranks and hasattr(evaluation, "prepare_references"):
        # the teacher's reference samples, unless cached (collective: every rank evaluates here)
        cast(Any, evaluation).prepare_references(lambda: eval_teacher(run))
    total, eval_every = tc.num_steps(), eval_interval(config)
    log = (
        RunLogger(
            run_dir, total=total, initial=trainer.iteration, images_seen=trainer.images_seen, progress=progress and main
        )
        if main
        else None
    )
    selector = (
        SnapshotSelector(
            run_dir,
            config.eval.student_steps,
            to_dict(config),
            per_steps=config.eval.select == "validation_per_steps",
            metric=getattr(evaluation, "selection_metric", None) or "fid",
        )
        if evaluation is not None and config.eval.select != "final"
        else None
    )
    history: list[dict[str, Any]] = []
    if eval_every and trainer.iteration == 0 and config.eval.at_start == "on":  # the untrained generator
        student = eval_generator(run)
        if evaluation is not None and student is not None:
            row = evaluation.score_student(cast(Denoiser, student), trainer.images_seen)
            if main:
                history.append(row)
        del student  # under FSDP2 a gathered copy: not kept through training

    train_seconds = 0.0
    while trainer.iteration < total:
        tick = time.perf_counter()
        metrics = trainer.step()  # fake-score phase, then generator phase (Algorithm 1)
        train_seconds += time.perf_counter() - tick
        it = trainer.iteration
        postfix = None
        if it % tc.log_every == 0 or it == total:  # the only host read of the losses (all ranks join)
            metrics.update(mean_over_ranks({k: v for k, v in metrics.items() if k.startswith("loss_")}))
            if log is not None:
                metrics["images_per_s"] = log.throughput(trainer.images_seen, train_seconds)
                log.row(metrics)
                postfix = {
                    "fake": f"{metrics['loss_fake']:.4g}",
                    "gen": f"{metrics['loss_gen']:.4g}",
                    "k": metrics["k"],
                    "img_s": f"{metrics['images_per_s']:.1f}",
                }
        if log is not None:
            log.advance(postfix)
        if eval_every and it % eval_every == 0 and it != total:
            student = eval_generator(run)  # collective under FSDP2
            if evaluation is not None and student is not None:  # every evaluating rank takes part
                scored = evaluation.score_student(cast(Denoiser, student), trainer.images_seen)
                if log is not None:
                    history.append(scored)
                    log.row(scored)
                    kept = selector.offer(scored, student) if selector is not None else []
                    log.say(evaluation.describe(scored) + kept_note(kept, selector))
            del student  # under FSDP2 a gathered copy: not kept through training
        if tc.ckpt_every and it % tc.ckpt_every == 0 and it != total:
            save_trainer(trainer, run_dir, to_dict(config), is_main=main, sharded=run.sharded, keep=tc.keep_checkpoints)

    result: dict[str, Any] = {
        "iterations": trainer.iteration,
        "images_seen": trainer.images_seen,
        "train_seconds": train_seconds,
    }
    ckpt = save_trainer(trainer, run_dir, to_dict(config), is_main=main, sharded=run.sharded, keep=tc.keep_checkpoints)
    release_optimizer_state(run)  # training is over: room for the gathered generator and the teacher
    final_gen = eval_generator(run)
    final = (
        evaluation.score_student(cast(Denoiser, final_gen), trainer.images_seen)
        if evaluation is not None and final_gen is not None
        else None
    )  # every evaluating rank takes part
    if log is None or ckpt is None or final_gen is None:
        return {"rank": ctx.rank, **result}
    result.update(
        checkpoint=str(ckpt.relative_to(run_dir)),
        nonfinite_total=trainer.nonfinite_total,
        world_size=ctx.world_size,
        sharding="fsdp2" if run.sharded else "none",
    )
    generators = None
    if evaluation is not None and final is not None:
        history.append(final)
        log.row(final)
        result["final"], result["history"] = final, history
        if selector is not None:
            selector.offer(final, final_gen)
        if selector is not None and selector.kept:
            # report, grid and export the snapshots the run chose on validation
            steps = config.eval.student_steps
            generators = selected_generators(selector, final, final_gen, steps)
            reported = reported_row(selector, final, steps)
            if reported != final:
                result["final"], result["last"] = reported, final
            final_gen = generators[max(generators)]
            result["selected"] = selected_info(selector, run_dir, steps)
        result["teacher"] = evaluation.teacher_reference()
    log.close()
    result["wall_seconds_before_report"] = time.perf_counter() - start
    from sidflow.run.report import finish_run  # lazy: matplotlib

    teacher = teacher_for_report(run, ctx.device)
    finish_run(run_dir, config, teacher, final_gen, run.latent_shape, evaluation, result, generators=generators)
    return result
