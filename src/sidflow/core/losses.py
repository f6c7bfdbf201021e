"""SiD losses as pure per-sample tensor functions (spec sections 4, 5, 7).

Score identity Distillation (Zhou et al., ICML 2024, eq. 8-10 / the "alpha" loss), in its
flow-matching form (arXiv 2509.25127, eq. 7-9): with the teacher and fake-score x0-predictions
``x0_teacher = x_t - t v_teacher`` and ``x0_fake = x_t - t v_fake`` at ``x_t = (1 - t) x_g + t eps``,

    general alpha:  l = (x0_teacher - x0_fake) * [(x0_teacher - x_g) - alpha (x0_teacher - x0_fake)] * w(t)
    alpha = 1:      l = (x0_teacher - x0_fake) * (x0_fake - x_g) * w(t)

and the fake score regresses the velocity ``eps - x_g`` (no time weight). Every function returns
the per-sample SUM over elements, shape ``[B]``; the trainer multiplies by ``ls``/``lsg`` and divides
by the per-rank batch. Non-finite samples are never dropped here: :func:`finite_mask` and
:func:`masked_sum` let the caller exclude and *count* them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sidflow.core.flow import expand_t

__all__ = [
    "WEIGHTINGS",
    "loss_weight",
    "sid_generator_loss",
    "fake_score_loss",
    "discriminator_loss",
    "generator_adv_loss",
    "finite_mask",
    "masked_sum",
    "LOGIT_CLAMP",
]

WEIGHTINGS = (
    "1_minus_sigma",
    "1_minus_sigma_squared",
    "1_over_sigma",
    "1_over_sigma2",
    "snr_sqrt",
    "snr",
    "sid_legacy",
)
LOGIT_CLAMP = 10.0
_FLOOR = 1e-5


def _sum_per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


@torch.no_grad()
def loss_weight(weighting: str, t: Tensor, x_g: Tensor | None = None, x0_teacher: Tensor | None = None) -> Tensor:
    """Per-sample weight ``w`` of spec 5.1 (sigma = t), computed without gradient.

    Args:
        weighting: one of :data:`WEIGHTINGS`.
        t: times ``[B]``.
        x_g, x0_teacher: ``[B, ...]``, needed only by ``"sid_legacy"`` (``1 / mean|x_g - x0_teacher|``).

    Returns:
        ``w`` of shape ``[B]`` (float32 for ``sid_legacy``, else the dtype of ``t``).
    """
    if weighting == "1_minus_sigma":
        return 1 - t
    if weighting == "1_minus_sigma_squared":
        return (1 - t) ** 2
    if weighting == "1_over_sigma":
        return 1 / t.clamp(min=_FLOOR)
    if weighting == "1_over_sigma2":
        return 1 / (t**2).clamp(min=_FLOOR)
    if weighting == "snr_sqrt":
        return 1 / (t / (1 - t)).clamp(min=_FLOOR)
    if weighting == "snr":
        return 1 / ((t / (1 - t)) ** 2).clamp(min=_FLOOR)
    if weighting == "sid_legacy":
        if x_g is None or x0_teacher is None:
            raise ValueError("weighting 'sid_legacy' needs x_g and x0_teacher")
        diff = (x_g.float() - x0_teacher.float()).abs().reshape(x_g.shape[0], -1)
        return 1 / diff.mean(dim=1).clamp(min=_FLOOR)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


def sid_generator_loss(
    x_g: Tensor,
    x0_teacher: Tensor,
    x0_fake: Tensor,
    t: Tensor,
    alpha: float = 1.0,
    weighting: str = "1_minus_sigma",
    *,
    x0_fake_second: Tensor | None = None,
) -> Tensor:
    """SiD generator loss per sample, the sum over elements of ``l`` (spec 5, step 7).

    Gradients flow through all three of ``x_g``, ``x0_teacher`` and ``x0_fake`` (keep the latter two in
    the graph: the SiD gradient includes both networks' input Jacobians); only ``w`` is detached.

    Args:
        x_g: generator output ``[B, ...]``.
        x0_teacher: teacher x0-prediction (CFG kappa4) ``[B, ...]``.
        x0_fake: fake-score x0-prediction (CFG kappa2) ``[B, ...]``, in the first factor.
        t: times ``[B]``.
        alpha: SiD's alpha; 1 gives the short form.
        weighting: one of :data:`WEIGHTINGS`.
        x0_fake_second: the fake prediction in the second factor (CFG kappa3, SiD-LSG); default
            ``x0_fake``.

    Returns:
        ``[B]`` per-sample sums (before ``lsg`` and the batch division).
    """
    y_fake2 = x0_fake if x0_fake_second is None else x0_fake_second
    w = expand_t(loss_weight(weighting, t, x_g, x0_teacher), x_g)
    if alpha == 1.0:
        elem = (x0_teacher - x0_fake) * (y_fake2 - x_g)
    else:
        elem = (x0_teacher - x0_fake) * ((x0_teacher - x_g) - alpha * (x0_teacher - y_fake2))
    return _sum_per_sample(elem * w)


def fake_score_loss(v_fake: Tensor, x_g: Tensor, eps: Tensor) -> Tensor:
    """Fake-score loss per sample: ``sum (v_fake - (eps - x_g))^2`` (spec 4, step 6), shape ``[B]``."""
    return _sum_per_sample((v_fake - (eps - x_g)) ** 2)


def _bce_mean(logits: Tensor, target: float) -> Tensor:
    z = logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP).reshape(logits.shape[0], -1)
    return F.binary_cross_entropy_with_logits(z, torch.full_like(z, target), reduction="none").mean(1)


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, latent_numel: int) -> Tensor:
    """SiDA discriminator loss per sample (spec 7.2), shape ``[B]``.

    ``0.5 (BCE(clamp(l_real), 1) + BCE(clamp(l_fake), 0)) * latent_numel``, each BCE averaged over the
    ``C`` logits of a sample; ``latent_numel = C_lat H_lat W_lat`` puts it on the summed-MSE scale.
    """
    return 0.5 * (_bce_mean(logits_real, 1.0) + _bce_mean(logits_fake, 0.0)) * latent_numel


def generator_adv_loss(logits_gen: Tensor, weight: Tensor, latent_numel: int) -> Tensor:
    """SiDA non-saturating generator loss per sample (spec 7.3): ``BCE(clamp(l), 1) * w * numel``."""
    return _bce_mean(logits_gen, 1.0) * weight.detach().float() * latent_numel


def finite_mask(*tensors: Tensor) -> Tensor:
    """``[B]`` bool: True where every listed ``[B, ...]`` tensor is finite in that sample."""
    mask = None
    for x in tensors:
        ok = torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
        mask = ok if mask is None else mask & ok
    if mask is None:
        raise ValueError("finite_mask needs at least one tensor")
    return mask


def masked_sum(per_sample: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of ``per_sample [B]`` over ``mask``; returns ``(sum, number of excluded samples)``.

    Excluded entries are replaced by zero with ``torch.where`` so they contribute no gradient path of
    their own (the caller still applies ``nan_to_num`` on parameter gradients). The count stays a
    0-dim int64 tensor on the device: reading it is a host sync, which the trainer does once per phase.
    """
    mask = mask & torch.isfinite(per_sample.detach())
    total = torch.where(mask, per_sample, torch.zeros_like(per_sample)).sum()
    return total, (~mask).sum()
