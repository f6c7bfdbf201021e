"""Energy distance of SiD students on the analytic Gaussian mixture (issue 2, item 3).

Distils a 1-step and a 4-step generator with the ``gmm-2d-1step`` and ``gmm-2d`` presets and prints the
energy distance to fresh mixture samples against iteration, next to the exact teacher's Euler sampler
at 1, 2, 4, 8, 16 and 32 steps (same evaluation noise, labels, reference samples and sample count).

    OMP_NUM_THREADS=1 python benchmarks/gmm.py [--points 8] [--out DIR] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sidflow.config import apply_overrides
from sidflow.run.presets import get_preset
from sidflow.toy.runner import TEACHER_STEPS, run_gmm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=8, help="evaluations per run")
    p.add_argument("--out", type=Path, default=None, help="run folders + gmm_benchmark.json (default: temp)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to both runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="sidflow-gmm-"))
    runs = {}
    for label, preset in (("1-step", "gmm-2d-1step"), ("4-step", "gmm-2d")):
        cfg = apply_overrides(get_preset(preset), args.overrides)
        runs[label] = run_gmm(cfg, out / preset, progress=True, eval_points=args.points)
    print(f"\nenergy distance to {runs['4-step']['eval_samples']} fresh mixture samples (lower is better)")
    print(f"{'student':>8} {'iteration':>10} {'energy distance':>16}")
    for label, run in runs.items():
        for row in run["history"]:
            print(f"{label:>8} {row['iteration']:>10} {row['energy_distance']:>16.5f}")
    print(f"\n{'exact teacher Euler steps':>26} {'energy distance':>15}")
    for steps in TEACHER_STEPS:
        print(f"{steps:>26} {runs['4-step']['teacher_euler'][str(steps)]['energy_distance']:>15.5f}")
    for label, run in runs.items():
        f = run["final"]
        print(
            f"{label}: final {f['energy_distance']:.5f}, component share {f['component_share_min']:.2f}-"
            f"{f['component_share_max']:.2f} of expected, prompted-class share "
            f"{f['prompted_class_share']:.3f}, {run['seconds']:.0f} s"
        )
    (out / "gmm_benchmark.json").write_text(json.dumps(runs, indent=1))
    print(f"results -> {out / 'gmm_benchmark.json'}")


if __name__ == "__main__":
    main()
