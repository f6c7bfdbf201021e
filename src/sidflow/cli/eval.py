"""``sidflow eval TARGET``: text-to-image figures of a distilled generator (FD-DINOv2, FID, CLIP
score, PickScore), for a run folder or an exported pipeline.

    sidflow eval runs/sd3 eval.prompts=coco/captions.jsonl eval.reference=coco/images
    sidflow eval runs/sd3/generator_pipeline eval.prompts=prompts.txt          # FD against the teacher
    torchrun --nproc_per_node 8 -m sidflow eval runs/flux eval.prompts=parti.txt eval.metrics=fd_dinov2,clip,pickscore

TARGET is the folder of a ``sidflow distill`` run (its config, and the weights ``sidflow sample``
uses: per step count the snapshot selected on validation, else the latest checkpoint) or an exported
``generator_pipeline`` folder (its ``sidflow_generator.json`` gives the step times; the reference
teacher is then ``--teacher``). ``eval.*`` overrides choose prompts, reference and metric models
(README, "Evaluating real teachers"); ``eval.reference=teacher`` (the default) compares with the
teacher's own samples of the same prompts from the same noise (FD-T). Reference features are cached
(``eval.feature_cache``), so a second call computes only the student's. Under ``torchrun`` every
rank generates and scores its share of the prompts and rank 0 writes the figures, equal to one
process's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, cast

from sidflow.atomic import atomic_file
from sidflow.errors import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidflow eval", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("target", type=Path, help="a 'sidflow distill' run folder or an exported generator_pipeline")
    p.add_argument("--steps", default=None, help="generator step counts, e.g. 1,4 (default: eval.student_steps)")
    p.add_argument(
        "--teacher", default=None, help="exported pipelines: the teacher (default: the one it was distilled from)"
    )
    p.add_argument("--out", type=Path, default=None, help="figures JSON (default TARGET/eval.json)")
    p.add_argument("overrides", nargs="*", help="eval.key=value overrides, e.g. eval.prompts=captions.jsonl")
    return p


def _exported(target: Path, teacher: str | None) -> tuple[Any, list[float]]:
    """Config and step times of an exported pipeline (its ``sidflow_generator.json``)."""
    from sidflow.config import SiDConfig, TeacherConfig

    settings = json.loads((target / "sidflow_generator.json").read_text())
    teacher = teacher or settings.get("teacher")
    if not teacher:
        raise ConfigError(f"{target} is an exported pipeline; pass --teacher FOLDER_OR_HUB_ID for its reference")
    sigmas = [float(s) for s in settings["sigmas"]]
    # the teacher settings the generator was distilled with (older exports: read from the teacher)
    distilled = {k: settings[k] for k in ("time_scale", "max_sequence_length") if settings.get(k) is not None}
    config = SiDConfig(teacher=TeacherConfig(path=teacher, **distilled))
    generator = dataclasses.replace(config.generator, num_steps=len(sigmas), noise_type=settings["noise_type"])
    data = dataclasses.replace(config.data, resolution=int(settings.get("resolution", config.data.resolution)))
    return dataclasses.replace(config, generator=generator, data=data), sigmas


def main(argv: list[str]) -> int:
    args, unknown = _parser().parse_known_args(argv)
    args.overrides = [*args.overrides, *unknown]  # overrides may also follow the options
    from sidflow.config import apply_overrides, from_json, to_dict
    from sidflow.run.distributed import init_from_env, shutdown

    target = args.target
    if (target / "config.json").is_file():
        config, sigmas = from_json((target / "config.json").read_text()), None
    elif (target / "sidflow_generator.json").is_file():
        config, sigmas = _exported(target, args.teacher)
    else:
        raise ConfigError(f"{target} is neither a 'sidflow distill' run folder nor an exported generator_pipeline")
    bad = [o for o in args.overrides if not o.lstrip("-").startswith("eval.")]
    if bad:
        raise ConfigError(f"sidflow eval takes eval.* overrides only; got {bad[0]!r}")
    config = apply_overrides(config, [*args.overrides, "eval.kind=t2i", "eval.select=final"])
    steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else config.eval.student_steps
    if not config.eval.prompts:
        raise ConfigError("sidflow eval needs eval.prompts=FILE (a prompt file, JSONL/CSV/parquet, or builtin:NAME)")
    ctx = init_from_env()
    try:
        figures = _evaluate(config, target, sigmas, steps, ctx)
    finally:
        shutdown(ctx)
    if ctx.is_main:
        out = args.out or target / "eval.json"
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps({**figures, "eval": to_dict(config)["eval"]}, indent=1, default=str) + "\n")
        print(f"figures -> {out}")
    return 0


def _evaluate(config: Any, target: Path, sigmas: list[float] | None, steps: tuple[int, ...], ctx: Any) -> dict:
    import torch

    from sidflow.eval.t2i import T2IEvaluation
    from sidflow.run.artifacts import load_run_generator, load_run_weights
    from sidflow.run.build import load_run_teacher
    from sidflow.run.registry import resolve_prompts

    start = time.perf_counter()
    if sigmas is None:
        _, teacher, generator, latent_shape = load_run_generator(target, ctx.device, steps=max(steps))
    else:
        teacher = load_run_teacher(config, ctx.device)
        generator = _exported_generator(teacher, target / "transformer")
        latent_shape = teacher.latent_shape(config.data.resolution)
    ec = config.eval
    evaluation = T2IEvaluation(
        config,
        teacher,
        latent_shape,
        ctx.device,
        prompts=resolve_prompts(ec.prompts, ec.prompt_column),
        rank=ctx.rank,
        world_size=ctx.world_size,
        step_times=sigmas,
    )
    row: dict[str, Any] = {}
    for k in steps:
        if sigmas is None:  # the weights sidflow sample uses for k steps (a per-k selected snapshot)
            load_run_weights(target, generator, steps=k)
        with torch.no_grad():
            row.update(evaluation.score_student(cast(Any, generator), 0, steps=(k,)))
        row.pop("images_seen", None)
        if ctx.is_main:
            print(evaluation.describe(row, steps=(k,)))
    return {
        "figures": row,
        "teacher": evaluation.teacher_reference(),
        "skipped": evaluation.metrics.skipped,
        "samples": len(evaluation.prompts),
        "world_size": ctx.world_size,
        "seconds": time.perf_counter() - start,
    }


def _exported_generator(teacher: Any, folder: Path) -> Any:
    """The teacher's denoiser with the exported transformer's weights (its safetensors files)."""
    import copy

    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no safetensors weights; pass a generator_pipeline written by sidflow")
    generator = copy.deepcopy(teacher.denoiser).requires_grad_(False).eval()
    state = {k: v for f in files for k, v in load_file(str(f), device=str(teacher.device)).items()}
    generator.transformer.load_state_dict(state)
    return generator
