"""Energy distance (Szekely & Rizzo 2013) between two sample sets.

``E(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with Euclidean norms over flattened samples, the
plug-in (V-statistic) estimate over all pairs; it is zero only when the distributions agree, and its
finite-sample floor is about ``E|X - X'| / n + E|Y - Y'| / m``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["energy_distance"]


@torch.no_grad()
def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance between samples ``x [n, ...]`` and ``y [m, ...]`` (computed in float64)."""
    a, b = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
