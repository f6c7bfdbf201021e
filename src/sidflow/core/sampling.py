"""Teacher Euler sampler with classifier-free guidance, in sidflow's time convention (spec 1, 5.2, 15).

Rectified flow, ``t = 1`` is noise: one Euler step of the probability-flow ODE from ``t_i`` to
``t_{i+1}`` is ``x <- x + (t_{i+1} - t_i) v(x, t_i)``, exactly what diffusers'
``FlowMatchEulerDiscreteScheduler.step`` does (``prev = x + (sigma_next - sigma) * v``, in fp32).
The step times come from the teacher adapter (``teacher.sigmas(num_steps, latent_shape)``), which
builds them with the pipeline's own scheduler config and shift, so with the same initial noise the sampler
reproduces ``pipe(..., output_type="latent")``. CFG (spec 5.2): ``w == 1`` one conditional pass,
``w == 0`` one unconditional pass, otherwise one batched ``[uncond; cond]`` pass and
``v = v_u + w (v_c - v_u)`` (:func:`sidflow.core.guidance.guided_velocity`). FLUX's embedded guidance
travels in ``cond.meta`` (:func:`sidflow.core.guidance.with_embedded_guidance`).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from sidflow.core.denoiser import Cond, Denoiser
from sidflow.core.guidance import guided_velocity

__all__ = ["euler_sample"]


@torch.no_grad()
def euler_sample(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor,
    cond: Cond,
    uncond: Cond | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Integrate the teacher's ODE from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps.

    Args:
        denoiser: the teacher denoiser.
        noise: initial state at ``t = sigmas[0]``, ``[B, C, h, w]``.
        sigmas: decreasing step times ``[N + 1]`` (e.g. ``teacher.sigmas(N, latent_shape)``).
        cond: conditioning (batch ``B``); uncond: the ``""`` conditioning for CFG.
        guidance_scale: CFG weight ``w``.

    Returns:
        fp32 latents at ``t = sigmas[-1]`` (``[B, C, h, w]``).
    """
    x = noise.float()
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    for i in range(sigmas.shape[0] - 1):
        t = sigmas[i].expand(x.shape[0])
        if guidance_scale != 1.0 and uncond is None:
            raise ValueError(f"guidance scale {guidance_scale} needs an unconditional Cond")
        # uncond is None only at guidance_scale == 1, where guided_velocity never reads it
        v = guided_velocity(denoiser, x, t, cond, cast(Cond, uncond), guidance_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x
