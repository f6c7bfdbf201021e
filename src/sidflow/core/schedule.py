"""Per-iteration schedules of the SiD run, as pure functions of the iteration (nothing to save for a
resume): the generator EMA's decay and the learning-rate decay tail."""

from __future__ import annotations

__all__ = ["ema_beta", "lr_factor"]


def ema_beta(batch: int, halflife_kimg: float) -> float:
    """Per-iteration EMA decay: the weight of the old average halves every ``halflife_kimg``
    thousand images, so ``beta = 0.5 ** (batch / (1000 halflife_kimg))``."""
    return 0.5 ** (batch / (halflife_kimg * 1000))


def lr_factor(iteration: int, total: int, decay_frac: float, decay_min: float = 0.0) -> float:
    """Learning-rate multiplier of ``iteration`` (0-based) in a run of ``total``: 1 until the last
    ``decay_frac`` of the run, then linear down to ``decay_min`` at the last iteration."""
    decay_iters = decay_frac * total
    if decay_iters <= 0:
        return 1.0
    start = total - decay_iters
    if iteration < start:
        return 1.0
    progress = min((iteration - start + 1) / decay_iters, 1.0)
    return 1.0 - (1.0 - decay_min) * progress
