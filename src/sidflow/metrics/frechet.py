"""Fréchet distance between Gaussian fits of features (Heusel et al., 2017, the FID formula).

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

The trace term is computed in float64 without a general matrix square root: ``S_a S_b`` is similar
to the symmetric PSD matrix ``M = S_a^{1/2} S_b S_a^{1/2}``, so ``Tr((S_a S_b)^{1/2}) =
sum_i sqrt(lambda_i(M))`` with symmetric eigendecompositions (``torch.linalg.eigh``) only. Written
here rather than taken from torchmetrics' ``FrechetInceptionDistance``, which needs the reference
*images* at every call (sidflow ships reference statistics) and pulls torchvision for Inception.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FeatureStats", "frechet_distance"]

Features = Union[Tensor, "np.ndarray"]


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of features: ``mu`` ``[D]``, ``sigma`` ``[D, D]`` (float64)."""

    mu: Tensor
    sigma: Tensor

    @staticmethod
    def of(features: Features) -> FeatureStats:
        """Mean and unbiased (N - 1) covariance of ``features`` ``[N, D]`` (a tensor or an array), in
        float64, as pytorch-fid and torchmetrics estimate them."""
        f = torch.as_tensor(features).double()
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"features must be [N, D] with N >= 2, got shape {list(f.shape)}")
        return FeatureStats(mu=f.mean(0), sigma=torch.cov(f.T).reshape(f.shape[1], f.shape[1]))

    def save(self, path: str | Path) -> None:
        save_file({"mu": self.mu.contiguous(), "sigma": self.sigma.contiguous()}, str(path))

    @staticmethod
    def load(path: str | Path) -> FeatureStats:
        stats = load_file(str(path))
        return FeatureStats(mu=stats["mu"], sigma=stats["sigma"])


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clamped)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: FeatureStats | Features, b: FeatureStats | Features) -> float:
    """Fréchet distance between two feature sets ``[N, D]`` (tensors or arrays) or their Gaussian
    fits (:class:`FeatureStats`), in float64; near-singular and rank-deficient covariances (fewer
    samples than dimensions) are handled by the symmetric square roots, never by an inverse."""
    a = a if isinstance(a, FeatureStats) else FeatureStats.of(a)
    b = b if isinstance(b, FeatureStats) else FeatureStats.of(b)
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature widths differ: {a.mu.shape[0]} and {b.mu.shape[0]}")
    s_a, s_b = a.sigma.double(), b.sigma.double()
    root_a = _sqrt_psd(s_a)
    middle = root_a @ s_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric up to round-off
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    diff = a.mu.double() - b.mu.double()
    return float(diff @ diff + torch.trace(s_a) + torch.trace(s_b) - 2.0 * trace_sqrt)
