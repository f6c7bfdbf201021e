"""The README's memory table: for each real teacher, the smallest setup that fits 80 GB GPUs.

Every figure comes from ``sidflow plan`` (:func:`sidflow.run.plan.plan`: one SiD iteration of the
true-size networks under fake tensors, measured by torch's memory trackers). For each preset at its
release resolution (FLUX.1-dev also at 1024 px) with ``train.precision=amp_bf16``, gradient
checkpointing of all three networks, prompts cached on disk (text encoders off the GPU) and the
preset's global batch 256, the search takes the first setup that fits, in this order:

1. GPUs 1, 2, 4, 8 with the preset's 8 samples per GPU (FSDP2 over more than one);
2. 8 GPUs with 4, 2, 1 samples per GPU;
3. 8 GPUs with FSDP2 CPU offload, 8 .. 1 samples per GPU.

A setup whose resident training state alone cannot fit is skipped without planning it: with
``amp_bf16`` every rank holds at least 30 bytes per transformer parameter over the GPUs (bf16
teacher 2, fp32 fake score and generator 8, their Adam moments 16, one network's fp32 gradients 4),
a lower bound of what the plan measures, so the skip never hides a fit.

    python benchmarks/plan_table.py [--gpu-memory-gib 80] [--only sd3-medium-4step] [--out FILE.json]

Each plan takes about 0.5-2.5 minutes here (one process, one thread); the whole table ~25 minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sidflow.cli.distill import resolve_config
from sidflow.config import apply_overrides
from sidflow.run.plan import plan

ROWS = [
    ("sd3-medium-4step", None),
    ("sd35-medium-4step", None),
    ("sd35-large-4step", None),
    ("flux-dev-4step", None),
    ("flux-dev-4step", 1024),
    ("sana-600m-4step", None),
    ("sana-1600m-4step", None),
]
BASE = ["train.precision=amp_bf16", "teacher.gradient_checkpointing=on", "data.cache_dir=prompt_cache"]


def _setups():
    for gpus in (1, 2, 4, 8):
        yield gpus, 8, "off"
    for batch_gpu in (4, 2, 1):
        yield 8, batch_gpu, "off"
    for batch_gpu in (8, 4, 2, 1):
        yield 8, batch_gpu, "on"


def _transformer_params(config) -> int:
    from sidflow.run.plan import teacher_spec
    from sidflow.teachers.configs import count_params, meta_model

    return count_params(meta_model(*teacher_spec(config.teacher.path)["components"]["transformer"]))


def smallest_fit(preset: str, resolution: int | None, gpu_gib: float) -> dict:
    """The first setup of :func:`_setups` that fits, with every plan tried on the way."""
    tried = []
    params = _transformer_params(resolve_config(preset, []))
    for gpus, batch_gpu, offload in _setups():
        if offload == "off" and 30 * params / gpus / 2**30 > gpu_gib:
            tried.append({"gpus": gpus, "batch_gpu": batch_gpu, "cpu_offload": offload, "skipped": "state > GPU"})
            continue
        overrides = [*BASE, f"train.batch_gpu={batch_gpu}", f"train.cpu_offload={offload}"]
        overrides.append(f"train.sharding={'fsdp2' if gpus > 1 else 'none'}")
        if resolution is not None:
            overrides.append(f"data.resolution={resolution}")
        config = apply_overrides(resolve_config(preset, []), overrides)
        result = plan(config, world_size=gpus, gpu_memory_gib=gpu_gib)
        row = {
            "gpus": gpus,
            "batch_gpu": batch_gpu,
            "cpu_offload": offload,
            "peak_gib": round(result["peak_gib_per_rank"], 1),
            "fits": result["fits"],
            "seconds": round(result["seconds"]),
            "breakdown_gib": {k: round(v, 2) for k, v in result["breakdown_gib"].items()},
        }
        print(preset, resolution or config.data.resolution, row, flush=True)
        tried.append(row)
        if result["fits"]:
            return {"preset": preset, "resolution": config.data.resolution, "fit": row, "tried": tried}
    return {"preset": preset, "resolution": config.data.resolution, "fit": None, "tried": tried}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--only", default=None, help="one preset")
    parser.add_argument("--start-at", default=None, help="skip the rows before this preset")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, results = time.perf_counter(), []
    started = args.start_at is None
    for preset, resolution in ROWS:
        started = started or preset == args.start_at
        if not started or (args.only and preset != args.only):
            continue
        results.append(smallest_fit(preset, resolution, args.gpu_memory_gib))
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| teacher | px | smallest setup on 80 GB GPUs | peak/GPU (GiB) |")
    print("|---|---|---|---|")
    for r in results:
        fit = r["fit"]
        setup = (
            "does not fit 8 GPUs"
            if fit is None
            else f"{fit['gpus']} GPU(s), amp_bf16, batch/GPU {fit['batch_gpu']}, checkpointing, "
            f"offload {fit['cpu_offload']}"
        )
        print(f"| {r['preset']} | {r['resolution']} | {setup} | {fit['peak_gib'] if fit else '-'} |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
