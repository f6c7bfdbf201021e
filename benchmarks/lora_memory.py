"""LoRA mode's memory: one frozen base with two adapters against three full copies (issue 12).

Planned at true size with ``sidflow plan`` (:func:`sidflow.run.plan.plan`, fake tensors, torch's
trackers), and measured on a tiny SD3 teacher on this CPU with the same trackers on real tensors:

* SD3-Medium, 1 GPU, 1024 px, the preset's settings (amp_bf16, checkpointing, batch 8 per GPU):
  full copies, ``lora.rank=64``, and ``lora.rank=64 lora.critic_checkpointing=off`` (the teacher's
  and fake score's passes keep their activations instead of recomputing under their adapter);
* FLUX.1-dev, 1 GPU, 512 px, ``lora.rank=64`` (full copies need 8 GPUs: README memory table);
* the tiny SD3 teacher (``sidflow.testing``), real tensors: full copies against ``lora.rank=4``.

    python benchmarks/lora_memory.py [--skip-true-size] [--out FILE.json]

About 6 minutes here (each true-size plan 1-2 minutes, one process).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sidflow.cli.distill import resolve_config
from sidflow.run.plan import plan

TRUE_SIZE = [
    ("sd3-medium-4step", []),
    ("sd3-medium-4step", ["lora.rank=64"]),
    ("sd3-medium-4step", ["lora.rank=64", "lora.critic_checkpointing=off"]),
    ("flux-dev-4step", ["data.resolution=512", "lora.rank=64"]),
]


def _row(label: str, result: dict, unit: str = "gib") -> dict:
    scale = 1024.0 if unit == "mib" else 1.0
    b = result["breakdown_gib"]
    keys = ("parameters", "gradients", "optimizer_state", "activations")
    row = {
        "run": label,
        "peak_gib": round(result["peak_gib_per_rank"], 2),
        "fits_80": result["fits"],
        "tracked_" + unit: round(result["tracked_peak_gib"] * scale, 3),
        **{f"{k}_{unit}": round(v * scale, 3) for k, v in b.items() if k in keys},
        "seconds": round(result["seconds"], 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-true-size", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    if not args.skip_true_size:
        for preset, extra in TRUE_SIZE:
            result = plan(resolve_config(preset, ["data.cache_dir=prompt_cache", *extra]), world_size=1)
            rows.append(_row(" ".join([preset, *extra]), result))
        full, lora = rows[0]["peak_gib"], rows[1]["peak_gib"]
        print(f"SD3-Medium 1 GPU: LoRA-64 / full copies = {lora / full:.3f}")
    from sidflow.testing import tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        teacher = tiny_pipeline("sd3", tmp)
        base = [f"teacher.path={teacher}", "teacher.time_scale=1000", "data.resolution=32", "train.batch_gpu=2"]
        start = time.perf_counter()
        measured = {}
        for label, extra in (("full", []), ("lora", ["lora.rank=4"])):
            result = plan(resolve_config("sd3-medium-4step", [*base, *extra]), world_size=1, fake=False)
            measured[label] = result["tracked_peak_gib"] * 1024  # MiB: tensors only (no VAE, no overhead)
            rows.append(_row(f"tiny SD3 (real tensors) {label}", result, unit="mib"))
        print(
            f"tiny SD3 measured on real tensors: LoRA / full tracked peak = "
            f"{measured['lora'] / measured['full']:.3f} ({measured['lora']:.2f} / {measured['full']:.2f} MiB, "
            f"{time.perf_counter() - start:.0f} s)"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
