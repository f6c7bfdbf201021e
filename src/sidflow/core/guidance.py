"""Classifier-free guidance (CFG) outside the denoiser, and FLUX-style embedded guidance.

CFG (Ho & Salimans 2022) in velocity space: ``v = v_uncond + scale (v_cond - v_uncond)``; because
``x0 = x_t - t v`` is affine in ``v`` the same combination holds for x0. SiD-LSG's "long and short
guidance" (Zhou et al. 2024) uses four scales (spec 5.2):

* ``kappa1``: fake score inside its own training loss;
* ``kappa2`` (= ``kappa3`` by default): fake score inside the generator loss;
* ``kappa4``: teacher inside the generator loss; the generator itself runs conditional-only.

``guided_velocity`` makes ONE network pass: ``scale == 1`` a conditional pass, ``scale == 0`` an
unconditional pass, otherwise a batched pass on ``[uncond; cond]`` (spec 5.2).

FLUX.1-dev's *embedded* guidance is a model input, not CFG: it travels as
``cond.meta["embedded_guidance"]`` (a float) that only the FLUX adapter reads; set it with
:func:`with_embedded_guidance`.
"""

from __future__ import annotations

from torch import Tensor

from sidflow.core.denoiser import Cond, Denoiser, FeatureDenoiser
from sidflow.core.flow import x0_from_velocity

__all__ = [
    "cfg",
    "guided_velocity",
    "guided_velocity_and_features",
    "guided_x0",
    "cond_uncond_velocity",
    "with_embedded_guidance",
    "EMBEDDED_GUIDANCE_KEY",
]

EMBEDDED_GUIDANCE_KEY = "embedded_guidance"


def cfg(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """CFG combination ``v_uncond + scale (v_cond - v_uncond)`` (works for velocities or x0)."""
    return v_uncond + scale * (v_cond - v_uncond)


def with_embedded_guidance(cond: Cond, value: float | None) -> Cond:
    """``cond`` with ``meta["embedded_guidance"] = value``; ``None`` returns ``cond`` unchanged."""
    if value is None:
        return cond
    return Cond(cond.tensors, {**dict(cond.meta), EMBEDDED_GUIDANCE_KEY: float(value)})


def _call(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Cond, features: bool) -> tuple[Tensor, Tensor | None]:
    if features:
        if not isinstance(denoiser, FeatureDenoiser):
            raise TypeError(f"{type(denoiser).__name__} has no discriminator features (velocity_and_features)")
        return denoiser.velocity_and_features(x_t, t, cond)
    return denoiser.velocity(x_t, t, cond), None


def cond_uncond_velocity(
    denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, *, features: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One batched pass on ``[uncond; cond]``: returns ``(v_uncond, v_cond, feats_cond or None)``."""
    n = x_t.shape[0]
    x2, t2 = x_t.repeat(2, *([1] * (x_t.ndim - 1))), t.repeat(2)
    v, feats = _call(denoiser, x2, t2, Cond.cat([uncond, cond]), features)
    return v[:n], v[n:], (feats[n:] if feats is not None else None)


def _guided(
    denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float, features: bool
) -> tuple[Tensor, Tensor | None]:
    if scale == 1.0:
        return _call(denoiser, x_t, t, cond, features)
    if scale == 0.0:
        return _call(denoiser, x_t, t, uncond, features)
    v_u, v_c, feats = cond_uncond_velocity(denoiser, x_t, t, cond, uncond, features=features)
    return cfg(v_u, v_c, scale), feats


def guided_velocity(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float) -> Tensor:
    """CFG velocity with one network pass (spec 5.2).

    Args:
        denoiser: any :class:`~sidflow.core.denoiser.Denoiser`.
        x_t: ``[B, ...]``; t: ``[B]``.
        cond, uncond: conditional and unconditional conditioning, batch ``B`` each.
        scale: CFG scale; 1 = conditional only, 0 = unconditional only.

    Returns:
        ``v`` ``[B, ...]``.
    """
    return _guided(denoiser, x_t, t, cond, uncond, scale, features=False)[0]


def guided_velocity_and_features(
    denoiser: FeatureDenoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float
) -> tuple[Tensor, Tensor]:
    """:func:`guided_velocity` plus the pooled features ``[B, C]`` of the conditional half (of the
    unconditional pass when ``scale == 0``), from the same single pass (SiDA, spec 7.1)."""
    v, feats = _guided(denoiser, x_t, t, cond, uncond, scale, features=True)
    assert feats is not None
    return v, feats


def guided_x0(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float) -> Tensor:
    """x0-prediction ``x_t - t * guided_velocity(...)`` (the ``y`` of the SiD loss)."""
    return x0_from_velocity(x_t, guided_velocity(denoiser, x_t, t, cond, uncond, scale), t)
