"""Gradient averaging across ranks: one all-reduce per parameter (the trainer today) vs coalesced.

:func:`sidflow.collectives.all_reduce_mean_` flattens the gradients into one buffer per dtype
(bounded by ``--bucket-mb``) and issues one collective per buffer. The parameter list is the
trainable parameters of a teacher's transformer (default: a tiny random SD3 pipeline built offline by
:mod:`sidflow.testing`; any diffusers folder, hub id or ``bundled`` works), so the tensor count and
sizes are those of a real network. Launch with torchrun:

    torchrun --standalone --nproc_per_node 2 benchmarks/allreduce.py [--teacher tiny-sd3] [--repeats 20]

On CPU this uses gloo; on GPUs NCCL (one GPU per rank). Prints the median seconds per averaging of
all gradients and the number of collectives, on rank 0.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sidflow.collectives import all_reduce_mean_
from sidflow.run.distributed import init_from_env, shutdown
from sidflow.run.registry import resolve_teacher_path


def _per_parameter(params: list[torch.nn.Parameter], world: int) -> None:
    for p in params:
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="tiny-sd3", help="diffusers pipeline folder, 'bundled' or 'tiny-sd3'")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline

    path = resolve_teacher_path(args.teacher)
    if args.teacher == "tiny-sd3":  # built before joining the group: transformers saves on rank 0 only
        from sidflow.testing import tiny_pipeline

        path = tiny_pipeline("sd3", Path(tempfile.mkdtemp(prefix="sidflow-allreduce-")))
    ctx = init_from_env()
    if ctx.world_size < 2:
        raise SystemExit("launch with torchrun --nproc_per_node 2 (or more)")
    transformer = DiffusionPipeline.from_pretrained(path).transformer.to(ctx.device)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    bucket = int(args.bucket_mb * 2**20)
    numel = sum(p.numel() for p in params)
    n_buckets = -(-numel * 4 // bucket)
    per_param = _time(lambda: _per_parameter(params, ctx.world_size), args.repeats, ctx.device)
    coalesced = _time(lambda: all_reduce_mean_(params, bucket_bytes=bucket), args.repeats, ctx.device)
    if ctx.is_main:
        print(f"{ctx.world_size} ranks ({ctx.backend}), {len(params)} gradients, {numel / 1e6:.2f} M values")
        print(f"per-parameter all-reduce: {len(params)} collectives, {per_param * 1e3:.2f} ms")
        print(
            f"coalesced all_reduce_mean_: ~{n_buckets} collective(s), {coalesced * 1e3:.2f} ms "
            f"({per_param / coalesced:.1f}x)"
        )
    shutdown(ctx)


if __name__ == "__main__":
    main()
