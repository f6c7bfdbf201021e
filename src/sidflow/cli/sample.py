"""``sidflow sample RUN_DIR``: images from a finished (or checkpointed) distillation run.

    sidflow sample runs/digits --prompt "the number 7" --prompt "a handwritten digit three" --steps 4
    sidflow sample runs/digits --prompts-file prompts.txt --steps 1 --out one_step.png

Uses the snapshot the run selected on validation (``selected/`` with ``eval.select=validation``;
with ``validation_per_steps`` the one kept for the nearest evaluated step count), else its latest
checkpoint (EMA weights when the run kept them), and the run's own config
(step schedule, noise type, resolution). Writes one PNG grid, one image per prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sidflow.errors import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidflow sample", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", type=Path, help="folder of a 'sidflow distill' run")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", type=Path, default=None, help="prompts, one per line")
    p.add_argument("--steps", type=int, default=None, help="generator steps, 1..K (default K)")
    p.add_argument("--seed", type=int, default=0, help="keys the initial and fresh noise")
    p.add_argument("--out", type=Path, default=None, help="output PNG (default RUN_DIR/sample.png)")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from sidflow.data.prompts import read_prompt_file
    from sidflow.eval.report import save_grid
    from sidflow.run.artifacts import sample_run

    prompts = list(args.prompt) + (read_prompt_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ConfigError("no prompts given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
    images = sample_run(args.run_dir, prompts, steps=args.steps, seed=args.seed)
    out = args.out or args.run_dir / "sample.png"
    save_grid(images, out, nrow=min(args.nrow, len(prompts)), scale=4 if images.shape[-1] <= 64 else 1)
    print(f"{len(prompts)} images -> {out}")
    return 0
