"""``sidflow plan``: will a run fit? Peak memory per GPU of one simulated SiD iteration at true size.

    sidflow plan [--preset P] [--teacher ID_OR_PATH] [--world-size N] [--gpu-memory-gib 80]
                 [--overhead-gib 2] [--json] [section.key=value ...]

The networks are built from the teacher's public config under fake tensors with a fake process
group of N ranks and run through the run's own construction and trainer, measured with torch's
memory trackers (:mod:`sidflow.run.plan`). Offline; no GPU, no weights.
"""

from __future__ import annotations

import argparse
import json

from sidflow.cli.distill import resolve_config
from sidflow.config import apply_overrides
from sidflow.run.plan import OVERHEAD_GIB, format_plan, plan

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidflow plan",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: section.key=value, e.g. data.resolution=512 train.batch_gpu=4 train.precision=fp32",
    )
    p.add_argument("--preset", default=None, help="named preset (its teacher, resolution and settings)")
    p.add_argument("--teacher", default=None, help="hub id or pipeline folder (overrides the preset's teacher)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs (FSDP2 shards over them when > 1)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument(
        "--overhead-gib", type=float, default=OVERHEAD_GIB, help="CUDA context, NCCL, fragmentation (default 2)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def main(argv: list[str]) -> int:
    args, unknown = _parser().parse_known_args(argv)
    overrides = list(args.overrides) + list(unknown)
    if args.teacher is not None:
        overrides.insert(0, f"teacher.path={args.teacher}")
    config = resolve_config(args.preset, [])
    if args.world_size > 1 and not any(o.startswith("train.sharding=") for o in overrides):
        overrides.insert(0, "train.sharding=fsdp2")  # a multi-GPU plan shards unless told otherwise
    config = apply_overrides(config, overrides)
    result = plan(
        config, world_size=args.world_size, gpu_memory_gib=args.gpu_memory_gib, overhead_gib=args.overhead_gib
    )
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0
