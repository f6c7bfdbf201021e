"""``sidflow distill``: resolve a preset plus dotted overrides, save the config, run the distillation.

    sidflow distill [--preset NAME] [--run-dir DIR] [--dry-run] [--no-progress] [section.key=value ...]

The run is dispatched on ``teacher.kind`` through :data:`RUNNERS` (``"gmm"``: the analytic
Gaussian-mixture distillation). Other packages add runners with :func:`register_runner` (and their
presets with :func:`sidflow.config.register_preset`); this module never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sidflow.presets  # noqa: F401  (registers the real-teacher presets and the bundled default)
from sidflow.config import PRESETS, SiDConfig, apply_overrides, get_preset, to_json
from sidflow.errors import ConfigError

__all__ = ["main", "RUNNERS", "register_runner", "DEFAULT_PRESET", "resolve_config"]

Runner = Callable[[SiDConfig, Path], dict[str, Any]]
DEFAULT_PRESET = "digits"  # the bundled tiny SD3 teacher (sidflow.presets)


def _run_gmm(config: SiDConfig, run_dir: Path) -> dict[str, Any]:
    from sidflow.toy.runner import format_table, run_gmm  # lazy: keeps `--dry-run` fast

    metrics = run_gmm(config, run_dir, progress=True)
    print(format_table(metrics))
    final = metrics["final"]
    print(f"final energy distance {final['energy_distance']:.5f} (exact teacher, 32 Euler steps: "
          f"{metrics['teacher_euler']['32']['energy_distance']:.5f}); metrics -> {run_dir / 'metrics.json'}")
    return metrics


def _run_pipeline(config: SiDConfig, run_dir: Path) -> dict[str, Any]:
    from sidflow.pipeline_runner import run_pipeline  # lazy: diffusers

    result = run_pipeline(config, run_dir, progress=True)
    if result.get("rank", 0):  # under torchrun only rank 0 reports
        return result
    final = result.get("final", {})
    for key in (k for k in final if k.startswith("fid_")):
        steps = key.removeprefix("fid_")
        print(f"student {steps}: FID {final[key]:.1f}, prompt accuracy {final['acc_' + steps]:.3f}")
    print(f"run folder: {run_dir} (report.md, samples.png, metrics.json); "
          f"{result['wall_seconds'] / 60:.1f} min")
    return result


RUNNERS: dict[str, Runner] = {"gmm": _run_gmm, "pipeline": _run_pipeline}


def register_runner(kind: str, runner: Runner, *, replace: bool = False) -> None:
    """Make ``teacher.kind=<kind>`` runnable by ``sidflow distill``."""
    if kind in RUNNERS and not replace:
        raise ConfigError(f"runner {kind!r} already registered")
    RUNNERS[kind] = runner


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidflow distill", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides: section.key=value, e.g. loss.alpha=1.2 "
                                       "guidance.kappa1=3 train.max_steps=500")
    p.add_argument("--preset", default=None, help=f"named preset (default {DEFAULT_PRESET}); one of: "
                   f"{', '.join(sorted(PRESETS))}")
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
        print("\n".join(sorted(PRESETS)))
        return 0
    config = resolve_config(args.preset, overrides)
    if args.dry_run:
        print(to_json(config))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and config.teacher.kind != "pipeline":
        raise ConfigError(f"teacher.kind={config.teacher.kind!r} runs in one process; launch it without "
                          "torchrun (only teacher.kind=pipeline is multi-process)")
    runner = RUNNERS.get(config.teacher.kind)
    if runner is None:
        raise ConfigError(f"teacher.kind={config.teacher.kind!r} has no runner; choose one of: "
                          f"{', '.join(sorted(RUNNERS))}")
    run_dir = args.run_dir or Path("runs") / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes the run folder
        (run_dir / "config.json").write_text(to_json(config))
    metrics = runner(config, run_dir)
    if not (run_dir / "metrics.json").exists():
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return 0

