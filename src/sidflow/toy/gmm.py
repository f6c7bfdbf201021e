"""A class-conditional Gaussian mixture with its exact denoiser ``E[x0 | x_t, c]``.

Data: component ``j`` is ``N(mu_j, s^2 I)``; class ``c`` picks component ``j`` with probability
``pi[c, j]``; the null class (label ``C``) uses the class-averaged weights (the unconditional
marginal, what CFG's unconditional branch models). Under ``x_t = (1 - t) x0 + t eps`` component ``j``
is ``N((1 - t) mu_j, sigma_t^2 I)``, ``sigma_t^2 = (1 - t)^2 s^2 + t^2``, so by Bayes' rule

    r_j(x_t) = softmax_j( log pi[c, j] - |x_t - (1 - t) mu_j|^2 / (2 sigma_t^2) )
    E[x0 | x_t, c] = sum_j r_j ( mu_j + (1 - t) s^2 / sigma_t^2 (x_t - (1 - t) mu_j) )

which :class:`GMMDenoiser` turns into the velocity ``(x_t - x0) / t``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sidflow.core import rng
from sidflow.core.denoiser import Cond
from sidflow.core.flow import velocity_from_x0

__all__ = ["GaussianMixture", "make_mixture", "GMMDenoiser", "GMMCondSource"]


@dataclass(frozen=True)
class GaussianMixture:
    """``means [M, D]``, shared isotropic ``std``, ``class_weights [C, M]`` (rows sum to 1)."""

    means: Tensor
    std: float
    class_weights: Tensor
    shape: tuple[int, ...]  # per-sample shape, prod(shape) == D
    owner: Tensor  # [M] the class each component belongs to (for class-share metrics)

    @property
    def num_classes(self) -> int:
        return self.class_weights.shape[0]

    def weights(self, labels: Tensor) -> Tensor:
        """``[B, M]`` component weights; label ``C`` is the null class (marginal)."""
        table = torch.cat([self.class_weights, self.class_weights.mean(0, keepdim=True)])
        return table[labels]

    def sample(self, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``x0 [B, *shape]`` for ``labels [B]``; also returns the component of each sample."""
        comp = torch.multinomial(self.weights(labels), 1, generator=generator).squeeze(1)
        noise = torch.randn(len(labels), self.means.shape[1], generator=generator)
        x0 = self.means[comp] + self.std * noise
        return x0.reshape(len(labels), *self.shape), comp

    def assign(self, x: Tensor) -> Tensor:
        """Nearest-mean component of each sample ``[B]``."""
        return torch.cdist(x.reshape(x.shape[0], -1).float(), self.means.float()).argmin(1)


def make_mixture(kind: str = "2d", own_weight: float = 0.7) -> GaussianMixture:
    """The bundled mixtures: ``"2d"`` (8 components on a circle of radius 2, std 0.3, 4 classes each
    owning two opposite components) or ``"image"`` (shape ``4x8x8``, 8 random means, 4 classes)."""
    num_comp, num_classes = 8, 4
    owner = torch.arange(num_comp) % num_classes
    w = torch.full((num_classes, num_comp), (1 - own_weight) / (num_comp - 2))
    w[owner, torch.arange(num_comp)] = own_weight / 2
    if kind == "2d":
        ang = torch.arange(num_comp) * (2 * math.pi / num_comp)
        means = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        return GaussianMixture(means, 0.3, w, (2,), owner)
    if kind == "image":
        g = torch.Generator().manual_seed(1234)
        means = torch.randn(num_comp, 256, generator=g) * 0.35
        return GaussianMixture(means, 0.5, w, (4, 8, 8), owner)
    raise ValueError(f"unknown mixture {kind!r}; choose '2d' or 'image'")


class GMMDenoiser(nn.Module):
    """The exact teacher: velocity of ``E[x0 | x_t, c]`` for ``cond["label"]`` (null class = C)."""

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.mixture = mixture

    def x0(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        m = self.mixture
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        tt = t.to(torch.float64).view(-1, 1)
        mu = m.means.to(x)  # [M, D]
        var_t = (1 - tt) ** 2 * m.std**2 + tt**2  # [B, 1]
        dist2 = ((x[:, None, :] - (1 - tt)[:, None] * mu[None]) ** 2).sum(-1)  # [B, M]
        logits = torch.log(m.weights(labels).to(x)) - dist2 / (2 * var_t)
        r = torch.softmax(logits, dim=1)  # posterior over components
        shrink = (1 - tt) * m.std**2 / var_t  # [B, 1]
        post = mu[None] + shrink[:, None] * (x[:, None, :] - (1 - tt)[:, None] * mu[None])
        return (r[..., None] * post).sum(1).reshape(x_t.shape)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        x0 = self.x0(x_t, t, cond["label"])
        return velocity_from_x0(x_t.to(torch.float64), x0, t.to(torch.float64)).to(
            torch.promote_types(x_t.dtype, torch.float32)
        )


class GMMCondSource:
    """Uniform class labels keyed per global sample index; ``uncond`` is the null class ``C``."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def sample(self, *, seed: int, iteration: int, stream: str, indices: Sequence[int]) -> Cond:
        # A keyed hash per sample (uniform over classes up to 2^-60): cheaper than a generator each.
        labels = [rng.key_seed(seed, iteration, f"{stream}/label", int(i)) % self.num_classes for i in indices]
        return Cond({"label": torch.tensor(labels, dtype=torch.long)})

    def uncond(self, batch_size: int) -> Cond:
        return Cond({"label": torch.full((batch_size,), self.num_classes, dtype=torch.long)})
