"""The one time convention of sidflow: rectified flow (RF) with ``t = 1`` pure noise.

Score Distillation of Flow Matching Models (arXiv 2509.25127), section 2; spec section 1::

    x_t = (1 - t) x0 + t eps,        eps ~ N(0, I),   t in [0, 1]
    v   = eps - x0                    (the network output, "velocity")
    x0  = x_t - t v                   (the Tweedie / x0-prediction D(x_t))
    eps = x_t + (1 - t) v
    score = grad log p_t(x_t) = -(x_t - (1 - t) x0) / t**2 = -eps / t

Every conversion below is a named function (never inline algebra elsewhere); ``t`` is always a
tensor of shape ``[B]`` broadcast over the remaining dimensions of ``x_t``. The other Gaussian paths
(TrigFlow, VP and VE diffusion) are mapped onto this one in :mod:`sidflow.core.paths`.

``t_from_variate`` maps a standard variate to the per-sample time of both SiD losses (spec 4.3): by
default ``t = sigmoid(N(ln 2, 1.6^2))``. The trainer draws that variate keyed per global sample index
(:meth:`sidflow.trainer.SiDTrainer.draw`); ``sample_t`` draws it from a ``torch.Generator`` (tools,
toy teachers, tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "T_KINDS",
    "expand_t",
    "add_noise",
    "x0_from_velocity",
    "velocity_from_x0",
    "eps_from_x0",
    "x0_from_eps",
    "velocity_from_eps",
    "eps_from_velocity",
    "score_from_x0",
    "x0_from_score",
    "score_from_velocity",
    "velocity_from_score",
    "sample_t",
    "t_from_variate",
]

T_KINDS = ("logit_normal", "uniform")


def expand_t(t: Tensor, x: Tensor) -> Tensor:
    """Reshape ``t`` of shape ``[B]`` to ``[B, 1, ..., 1]`` so it broadcasts against ``x [B, ...]``."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape [B]={[x.shape[0]]}, got {list(t.shape)}")
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def add_noise(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Forward process ``x_t = (1 - t) x0 + t eps``; shapes ``[B, ...]``, ``t [B]``."""
    tb = expand_t(t, x0)
    return (1 - tb) * x0 + tb * eps


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x0-prediction ``D = x_t - t v`` from a velocity ``v ~ eps - x0``."""
    return x_t - expand_t(t, x_t) * v


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """Velocity ``v = (x_t - x0) / t`` (undefined at ``t = 0``)."""
    return (x_t - x0) / expand_t(t, x_t)


def eps_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """Implied noise ``eps = (x_t - (1 - t) x0) / t``."""
    tb = expand_t(t, x_t)
    return (x_t - (1 - tb) * x0) / tb


def x0_from_eps(x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``x0 = (x_t - t eps) / (1 - t)`` (undefined at ``t = 1``)."""
    tb = expand_t(t, x_t)
    return (x_t - tb * eps) / (1 - tb)


def velocity_from_eps(x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``v = eps - x0 = (eps - x_t) / (1 - t)``."""
    return (eps - x_t) / (1 - expand_t(t, x_t))


def eps_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``eps = x0 + v = x_t + (1 - t) v``."""
    return x_t + (1 - expand_t(t, x_t)) * v


def score_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """Score of the marginal, ``grad log p_t(x_t) = -(x_t - (1 - t) x0) / t^2`` (Tweedie)."""
    tb = expand_t(t, x_t)
    return -(x_t - (1 - tb) * x0) / tb**2


def x0_from_score(x_t: Tensor, score: Tensor, t: Tensor) -> Tensor:
    """Tweedie's formula ``x0 = (x_t + t^2 score) / (1 - t)``."""
    tb = expand_t(t, x_t)
    return (x_t + tb**2 * score) / (1 - tb)


def score_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``score = -eps / t = -(x_t + (1 - t) v) / t``."""
    return -eps_from_velocity(x_t, v, t) / expand_t(t, x_t)


def velocity_from_score(x_t: Tensor, score: Tensor, t: Tensor) -> Tensor:
    """``v = (eps - x_t) / (1 - t)`` with ``eps = -t score``."""
    return velocity_from_eps(x_t, -expand_t(t, x_t) * score, t)


def sample_t(
    n: int,
    *,
    kind: str = "logit_normal",
    mean: float = math.log(2.0),
    std: float = 1.6,
    t_min: float = 0.0,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-sample times of the SiD losses, shape ``[n]`` (spec 4.3).

    Args:
        n: number of samples.
        kind: ``"logit_normal"`` (``t = sigmoid(mean + std * N(0, 1))``, no clipping) or
            ``"uniform"`` (``t ~ U(t_min, t_max)``, e.g. SiD-LSG's 0.02..0.98).
        mean, std: logit-normal location and scale (default ``ln 2``, ``1.6``: median ``t = 2/3``).
        t_min, t_max: the range of ``"uniform"``.
        generator: draw from this generator.
        device, dtype: of the result.

    Returns:
        ``t`` of shape ``[n]`` in ``[0, 1]``.
    """
    if kind not in T_KINDS:
        raise ValueError(f"unknown t sampling kind {kind!r}; choose one of {T_KINDS}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    if kind == "logit_normal":
        u = torch.randn(n, generator=generator, dtype=torch.float64)
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    return t_from_variate(u, kind=kind, mean=mean, std=std, t_min=t_min, t_max=t_max).to(device, dtype)


def t_from_variate(
    u: Tensor,
    *,
    kind: str = "logit_normal",
    mean: float = math.log(2.0),
    std: float = 1.6,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> Tensor:
    """Map a standard variate to ``t``: ``u ~ N(0, 1)`` for ``"logit_normal"``, ``U[0, 1)`` for ``"uniform"``."""
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * u)
    if kind == "uniform":
        return t_min + (t_max - t_min) * u
    raise ValueError(f"unknown t sampling kind {kind!r}; choose one of {T_KINDS}")
