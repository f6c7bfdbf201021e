"""The unified Gaussian-path view: TrigFlow and VP/VE diffusion mapped onto rectified-flow time.

Score Distillation of Flow Matching Models (arXiv 2509.25127), section 3 ("a unified view"): every
Gaussian path ``x_s = a_s x0 + b_s eps`` has the same conditional expectation ``E[x0 | x_s]`` as the
rectified-flow state ``x_t = x_s / (a_s + b_s)`` at time ``t = b_s / (a_s + b_s)``, because
``x_s / (a_s + b_s) = (1 - t) x0 + t eps``. So SiD, written for RF, distils any of them.

* TrigFlow: ``a = cos s``, ``b = sin s`` (``s`` an angle in ``[0, pi/2]``): ``t = sin s / (sin s + cos s)``.
* VP diffusion: ``a = sqrt(abar_s)``, ``b = sqrt(1 - abar_s)`` from a DDPM ``alphas_cumprod`` table;
  the native time ``s`` is a continuous index into it (log-SNR interpolated between entries).
* VE diffusion: ``a = 1``, ``b = sigma``, native time ``s = sigma``: ``t = sigma / (1 + sigma)``.

Predictions: ``"eps"``, ``"x0"``, or ``"v"`` with ``v = a eps - b x0`` (Salimans & Ho; also
TrigFlow's ``dx_s/ds``), giving ``x0 = (a x_s - b v) / (a^2 + b^2)``.

:class:`DiffusionDenoiser` does the inverse mapping so that a diffusion model
``model(x_s, s, cond) -> prediction`` acts as a sidflow :class:`~sidflow.core.denoiser.Denoiser`: for RF
time ``t`` it finds ``s`` with ``b_s / (a_s + b_s) = t``, feeds ``(a_s + b_s) x_t`` and converts the
prediction into the RF velocity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sidflow.core.denoiser import Cond
from sidflow.core.flow import expand_t, velocity_from_x0

__all__ = [
    "PREDICTIONS",
    "GaussianPath",
    "TrigFlowPath",
    "VPPath",
    "VEPath",
    "rf_time",
    "x0_from_prediction",
    "prediction_from_x0",
    "rf_from_diffusion",
    "DiffusionDenoiser",
]

PREDICTIONS = ("eps", "x0", "v")


def rf_time(a: Tensor, b: Tensor) -> Tensor:
    """Rectified-flow time ``t = b / (a + b)`` of the path point with coefficients ``(a, b)``."""
    return b / (a + b)


class GaussianPath:
    """A path ``x_s = a_s x0 + b_s eps`` indexed by the model's native time ``s``."""

    def coeffs(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_s, b_s)``, each with the shape of ``s``."""
        raise NotImplementedError

    def s_from_t(self, t: Tensor) -> Tensor:
        """The native time ``s`` with ``b_s / (a_s + b_s) = t``."""
        raise NotImplementedError

    def t_from_s(self, s: Tensor) -> Tensor:
        """RF time of native time ``s``."""
        return rf_time(*self.coeffs(s))


class TrigFlowPath(GaussianPath):
    """TrigFlow (sCM / SANA-Sprint): ``a = cos s``, ``b = sin s``, ``s in [0, pi/2]``."""

    def coeffs(self, s: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cos(s), torch.sin(s)

    def s_from_t(self, t: Tensor) -> Tensor:
        # tan s = b/a = t/(1-t); atan2 keeps t = 1 finite (s = pi/2).
        return torch.atan2(t, 1 - t)


class VEPath(GaussianPath):
    """Variance exploding: ``a = 1``, ``b = sigma``; the native time is ``sigma`` itself."""

    def coeffs(self, s: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(s), s

    def s_from_t(self, t: Tensor) -> Tensor:
        return t / (1 - t)


class VPPath(GaussianPath):
    """Variance preserving (DDPM) from a table ``alphas_cumprod [N]``; ``s`` in ``[0, N-1]``.

    Between table entries the log-SNR ``log(abar / (1 - abar))`` is interpolated linearly, so
    ``s_from_t`` and ``coeffs`` are exact inverses for continuous ``s``.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = alphas_cumprod.to(torch.float64)
        if abar.ndim != 1 or abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D table of values in (0, 1)")
        self.log_snr = torch.log(abar) - torch.log1p(-abar)  # decreasing in s
        if not bool((self.log_snr[1:] < self.log_snr[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")

    @classmethod
    def scaled_linear(cls, num: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> VPPath:
        """Stable Diffusion 1.x/2.x's ``scaled_linear`` beta schedule."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    def coeffs(self, s: Tensor) -> tuple[Tensor, Tensor]:
        n = self.log_snr.numel()
        s64 = s.to(torch.float64).clamp(0, n - 1)
        lo = s64.floor().long().clamp(max=n - 2)
        frac = s64 - lo
        lam = (1 - frac) * self.log_snr[lo] + frac * self.log_snr[lo + 1]
        a, b = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return a.to(s.dtype), b.to(s.dtype)

    def s_from_t(self, t: Tensor) -> Tensor:
        # b/a = t/(1-t)  =>  log-SNR = 2 log((1-t)/t); invert the piecewise-linear table.
        t64 = t.to(torch.float64)
        lam = 2 * (torch.log1p(-t64) - torch.log(t64))
        table = self.log_snr.flip(0)  # increasing
        n = table.numel()
        hi = torch.searchsorted(table, lam).clamp(1, n - 1)
        frac = (lam - table[hi - 1]) / (table[hi] - table[hi - 1])
        s_flipped = (hi - 1) + frac.clamp(0, 1)
        return ((n - 1) - s_flipped).to(t.dtype)


def x0_from_prediction(x_s: Tensor, pred: Tensor, a: Tensor, b: Tensor, prediction: str) -> Tensor:
    """x0 from a diffusion model's ``prediction`` at path point ``(a, b)`` (shapes ``[B]``)."""
    ab, bb = expand_t(a, x_s), expand_t(b, x_s)
    if prediction == "eps":
        return (x_s - bb * pred) / ab
    if prediction == "x0":
        return pred
    if prediction == "v":
        return (ab * x_s - bb * pred) / (ab**2 + bb**2)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def prediction_from_x0(x_s: Tensor, x0: Tensor, a: Tensor, b: Tensor, prediction: str) -> Tensor:
    """Inverse of :func:`x0_from_prediction` (what a perfect model of that kind outputs)."""
    ab, bb = expand_t(a, x_s), expand_t(b, x_s)
    eps = (x_s - ab * x0) / bb
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return ab * eps - bb * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def rf_from_diffusion(
    x_s: Tensor, pred: Tensor, a: Tensor, b: Tensor, prediction: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Map a diffusion state and prediction onto RF: returns ``(x_t, t, x0, v)``."""
    x0 = x0_from_prediction(x_s, pred, a, b, prediction)
    t = rf_time(a, b)
    x_t = x_s / expand_t(a + b, x_s)
    return x_t, t, x0, velocity_from_x0(x_t, x0, t)


class DiffusionDenoiser(nn.Module):
    """Wraps ``model(x_s, s, cond) -> prediction`` of a Gaussian-path diffusion model as a Denoiser.

    Args:
        model: callable (usually an ``nn.Module``) taking ``(x_s [B, ...], s [B], cond)``.
        path: the model's Gaussian path (:class:`TrigFlowPath`, :class:`VPPath`, :class:`VEPath`).
        prediction: ``"eps"``, ``"x0"`` or ``"v"``.
    """

    def __init__(self, model: Callable[[Tensor, Tensor, Cond], Tensor], path: GaussianPath, prediction: str) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        self.model, self.path, self.prediction = model, path, prediction

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """RF velocity at ``(x_t, t)``: ``x_s = (a_s + b_s) x_t`` at ``s`` with ``b_s/(a_s+b_s) = t``."""
        s = self.path.s_from_t(t)
        a, b = self.path.coeffs(s)
        x_s = expand_t(a + b, x_t) * x_t
        x0 = x0_from_prediction(x_s, self.model(x_s, s, cond), a, b, self.prediction)
        # fp32 out (the Denoiser contract); float64 inputs stay float64 for exact tests.
        return velocity_from_x0(x_t, x0, t).to(torch.promote_types(x_t.dtype, torch.float32))
