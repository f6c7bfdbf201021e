"""Quality against network evaluations: the teacher's Euler sampler vs the distilled generator (issue 4).

One table from one invocation: the teacher at 1, 2, 4, 8, 16, 32, 64 Euler steps for each guidance
scale (NFE counts both CFG passes when w != 1) and the run's generator at 1, 2 and 4 steps; FID in
the bundled evaluator's feature space, prompt accuracy, NFE and wall time per image (sampling and
decoding, this machine). Same evaluation prompts, initial noise and sample count for every row.
The generator is the one the run reports: its validation-selected snapshot when it kept one (per
step count with ``eval.select=validation_per_steps``). Several runs of the same teacher (e.g. SiD
and SiD + SiDA, issue 14) give one generator block each, side by side with the same teacher rows.

    python benchmarks/quality_vs_nfe.py runs/digits [runs/digits-sida ...] [--guidance 1 2] [--samples 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from sidflow.config import from_json
from sidflow.digits.evaluation import DigitsEvaluation
from sidflow.run.artifacts import load_run_generator, load_run_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", type=Path, nargs="+", help="finished 'sidflow distill' runs of the bundled teacher")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0], help="teacher CFG scales")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args()
    config, teacher, generator, shape = load_run_generator(args.run_dirs[0])
    config = dataclasses.replace(
        config, eval=dataclasses.replace(config.eval, num_samples=args.samples, student_steps=tuple(args.student_steps))
    )
    ev = DigitsEvaluation(config, teacher, shape, teacher.device)
    rows = []
    for w in args.guidance:
        for steps in args.teacher_steps:
            start = time.perf_counter()
            images = torch.cat(
                [
                    teacher.decode_latents(
                        teacher.sample(
                            ev.set.prompts[lo : lo + 250],
                            ev.set.noise[lo : lo + 250],
                            num_steps=steps,
                            guidance_scale=w,
                        )
                    )
                    .float()
                    .cpu()
                    for lo in range(0, args.samples, 250)
                ]
            )
            sec = (time.perf_counter() - start) / args.samples
            score = ev.evaluator.score(images, ev.set.labels)
            rows.append(
                {
                    "model": f"teacher Euler w={w:g}",
                    "steps": steps,
                    "nfe": steps * (1 if w == 1 else 2),
                    "fid": score["fid"],
                    "accuracy": score["accuracy"],
                    "sec_per_image": sec,
                }
            )
            print(_fmt(rows[-1]), flush=True)
    for run_dir in args.run_dirs:
        run_config = from_json((run_dir / "config.json").read_text())
        label = f"{'SiD + SiDA' if run_config.gan.mode == 'sida' else 'SiD'} ({run_dir.name})"
        ev.config = dataclasses.replace(run_config, eval=config.eval)  # its schedule, the same protocol
        for steps in args.student_steps:
            load_run_weights(run_dir, generator, steps=steps)  # what the run reports for this step count
            images, sec = ev.images(generator, steps)
            score = ev.evaluator.score(images, ev.set.labels)
            rows.append(
                {
                    "model": label,
                    "steps": steps,
                    "nfe": steps,
                    "fid": score["fid"],
                    "accuracy": score["accuracy"],
                    "sec_per_image": sec,
                }
            )
            print(_fmt(rows[-1]), flush=True)
    floor = ev.evaluator.info.get("floor_fid")
    print(f"\n{args.samples} samples per row; real-vs-real FID floor {floor:.1f}" if floor else "")
    print("| model | steps | NFE | FID | prompt acc | ms/image |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['steps']} | {r['nfe']} | {r['fid']:.1f} | {r['accuracy']:.3f} | "
            f"{r['sec_per_image'] * 1e3:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"floor_fid": floor, "rows": rows}, indent=1) + "\n")


def _fmt(r: dict) -> str:
    return (
        f"{r['model']:>22} steps {r['steps']:>2} NFE {r['nfe']:>3}: FID {r['fid']:8.1f} "
        f"acc {r['accuracy']:.3f} {r['sec_per_image'] * 1e3:.2f} ms/image"
    )


if __name__ == "__main__":
    main()
