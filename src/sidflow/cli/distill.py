"""``sidflow distill``: resolve a preset plus dotted overrides, save the config, run the distillation.

    sidflow distill [--preset NAME] [--run-dir DIR] [--dry-run] [--list-presets] [section.key=value ...]

``teacher.kind=pipeline`` runs :func:`sidflow.run.loop.run_pipeline`; other kinds are plugin runners
(:mod:`sidflow.run.registry`, e.g. ``gmm``). The default preset is the bundled digits benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from sidflow.atomic import atomic_file
from sidflow.config import SiDConfig, apply_overrides, to_json
from sidflow.errors import ConfigError
from sidflow.eval.protocol import figures
from sidflow.run.presets import get_preset, preset_names
from sidflow.run.registry import get_runner, validate

__all__ = ["main", "DEFAULT_PRESET", "resolve_config"]

DEFAULT_PRESET = "digits"  # the bundled tiny SD3 teacher (sidflow.digits)


def _run_pipeline(config: SiDConfig, run_dir: Path) -> dict[str, Any]:
    from sidflow.run.loop import run_pipeline  # lazy: diffusers

    result = run_pipeline(config, run_dir, progress=True)
    if result.get("rank", 0):  # under torchrun only rank 0 reports
        return result
    final = result.get("final", {})
    for steps in config.eval.student_steps:
        shown = figures(final, steps)
        if shown:
            print(f"student {steps}step: " + ", ".join(f"{label} {value:.4g}" for label, value in shown.items()))
    print(f"run folder: {run_dir} (report.md, samples.png, metrics.json); {result['wall_seconds'] / 60:.1f} min")
    return result


def _make_run_dir(run_dir: Path) -> None:
    """Create the run folder, or one ConfigError line when the path (or a folder above it) is a file:
    ``mkdir`` would otherwise end the run in a FileExistsError traceback before anything started."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is an existing file, not a folder; pass a folder path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--run-dir {run_dir} lies under an existing file; pass a folder path") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidflow distill",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: section.key=value, e.g. loss.alpha=1.2 guidance.kappa1=3 train.max_steps=500",
    )
    p.add_argument(
        "--preset", default=None, help=f"named preset (default {DEFAULT_PRESET}); --list-presets prints them"
    )
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default runs/<preset>)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config JSON and exit")
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def resolve_config(preset: str | None, overrides: list[str]) -> SiDConfig:
    """Preset (default :data:`DEFAULT_PRESET`) with the overrides applied."""
    return apply_overrides(get_preset(preset or DEFAULT_PRESET), overrides)


def main(argv: list[str]) -> int:
    args, unknown = _parser().parse_known_args(argv)
    overrides = list(args.overrides) + list(unknown)  # allow --loss.alpha=1.2 spelling too
    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    config = resolve_config(args.preset, overrides)
    validate(config)
    if args.dry_run:
        print(to_json(config))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and config.teacher.kind != "pipeline":
        raise ConfigError(
            f"teacher.kind={config.teacher.kind!r} runs in one process; launch it without "
            "torchrun (only teacher.kind=pipeline is multi-process)"
        )
    runner = _run_pipeline if config.teacher.kind == "pipeline" else get_runner(config.teacher.kind)
    run_dir = args.run_dir or Path("runs") / config.name
    _make_run_dir(run_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes the run folder
        (run_dir / "config.json").write_text(to_json(config))
    metrics = runner(config, run_dir)
    # the pipeline runner writes metrics.json itself (rank 0, before the others return); never a
    # second writer from another rank
    if int(os.environ.get("RANK", "0")) == 0 and not (run_dir / "metrics.json").exists():
        with atomic_file(run_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=1, default=str))
    return 0
