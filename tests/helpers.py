"""Shared test helpers (on the path through ``[tool.pytest.ini_options] pythonpath``)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import torch


def generator_gradients(trainer: Any, iteration: int) -> dict[str, Any]:
    """Run ``trainer.generator_phase(iteration)`` and leave the generator as it was before the Adam
    step, with ``.grad`` holding the gradients exactly as the optimiser received them (captured by
    torch's optimizer step pre-hook). Returns the phase's metrics."""
    before = [p.detach().clone() for p in trainer.gen_params]
    captured: list[torch.Tensor | None] = []

    def hook(*_: Any) -> None:
        captured.extend(None if p.grad is None else p.grad.detach().clone() for p in trainer.gen_params)

    handle = trainer.opt_gen.register_step_pre_hook(hook)
    try:
        metrics = trainer.generator_phase(iteration)
    finally:
        handle.remove()
    with torch.no_grad():
        for p, value, grad in zip(trainer.gen_params, before, captured, strict=True):
            p.copy_(value)
            p.grad = grad
    return metrics


def torch_env() -> dict[str, str]:
    """The environment of a torchrun child: offline, CPU, one thread, no inherited rank variables."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=nproc *args``, checked."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    out = subprocess.run(cmd, env=torch_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out
