"""Shared test helpers (on the path through ``[tool.pytest.ini_options] pythonpath``)."""

from __future__ import annotations

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
