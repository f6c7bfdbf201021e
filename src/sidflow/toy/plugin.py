"""The analytic Gaussian-mixture distillation as a sidflow plugin (entry point ``sidflow.plugins: gmm``):
the ``teacher.kind=gmm`` runner and the ``gmm-*`` presets (issue 2's end-to-end proof).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidflow.config import GeneratorConfig, GuidanceConfig, OptimConfig, SiDConfig, TeacherConfig, TrainConfig
from sidflow.run.presets import register_preset
from sidflow.run.registry import register_runner

__all__ = ["register", "run"]


def _gmm(kind: str, num_steps: int, kappa: float, max_steps: int, glr: float) -> SiDConfig:
    """The analytic Gaussian-mixture distillation (issue 2's end-to-end proof), tuned for 1 CPU thread.

    Tuned on a separate evaluation seed: a fast fake score (lr 2e-3) and a slow generator, EMA of
    the generator (half-life 20k images). The 4-step run is short because the uniform mixture over
    k makes the 4-step output compensate the 1-step output's errors as training goes on.
    """
    return SiDConfig(
        teacher=TeacherConfig(kind="gmm", path=kind),
        generator=GeneratorConfig(num_steps=num_steps),
        guidance=GuidanceConfig(kappa1=kappa, kappa2=kappa, kappa4=kappa),
        optim=OptimConfig(lr=2e-3, glr=glr),
        train=TrainConfig(
            batch=128, batch_gpu=128, max_steps=max_steps, log_every=100, ckpt_every=0, ema_halflife_kimg=20.0
        ),
    )


def run(config: SiDConfig, run_dir: Path) -> dict[str, Any]:
    """``sidflow distill`` with ``teacher.kind=gmm``: distil, evaluate, print the table."""
    from sidflow.toy.runner import format_table, run_gmm  # lazy: keeps `--dry-run` fast

    metrics = run_gmm(config, run_dir, progress=True)
    print(format_table(metrics))
    final = metrics["final"]
    print(
        f"final energy distance {final['energy_distance']:.5f} (exact teacher, 32 Euler steps: "
        f"{metrics['teacher_euler']['32']['energy_distance']:.5f}); metrics -> {run_dir / 'metrics.json'}"
    )
    return metrics


def register() -> None:
    """Plug the runner and the presets in (called once by :func:`sidflow.run.registry.load_plugins`)."""
    register_runner("gmm", run, replace=True)
    register_preset("gmm-2d", _gmm("2d", 4, 1.0, 500, 2.5e-4), replace=True)
    register_preset("gmm-2d-1step", _gmm("2d", 1, 1.0, 1600, 1.5e-4), replace=True)
    register_preset("gmm-2d-cfg3", _gmm("2d", 1, 3.0, 500, 1.5e-4), replace=True)
    register_preset("gmm-image", _gmm("image", 4, 1.0, 500, 2.5e-4), replace=True)
