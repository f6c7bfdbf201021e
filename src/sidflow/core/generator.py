"""The few-step generator sampler of SiD-DiT (spec section 3).

Few-step SiD (arXiv 2509.25127, section 4): a K-step sampler that re-noises its previous
x0-guess ``D`` to the next step time and asks the generator network (a Denoiser initialised from the
teacher) for a new guess::

    D = 0
    for i in 0..k-1:   x_i = (1 - t_i) D + t_i noise_i ;  D = x_i - t_i G(x_i, t_i, c)

with ``t_i = t_init (1 - i/K)`` (1, .75, .5, .25 by default; optional SD3 warp ``s t / (1 + (s-1) t)``)
and ``noise_0 = z``. ``noise_i`` for ``i >= 1`` is fresh Gaussian noise (``"fresh"``), the initial
``z`` again (``"fixed"``), or the noise implied by the previous step (``"ddim"``, an Euler step of the
RF ODE). Training runs a prefix of ``k <= K`` steps (the schedule is truncated, not re-spaced) and
back-propagates through the last executed network call only; earlier steps run under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sidflow.core import rng
from sidflow.core.denoiser import Cond, Denoiser
from sidflow.core.flow import eps_from_x0, x0_from_velocity

__all__ = ["NOISE_TYPES", "generator_step_times", "sample_generator", "draw_fresh_noise", "generate"]

NOISE_TYPES = ("fresh", "fixed", "ddim")


def generator_step_times(num_steps: int = 4, t_init: float = 1.0, shift: float | None = None) -> list[float]:
    """Step times ``t_i = t_init (1 - i / K)``, ``i = 0..K-1`` (spec 3.1).

    Args:
        num_steps: K.
        t_init: time of the first step (1 = pure noise; SiD-DiT always uses 1).
        shift: optional SD3-style warp ``shift t / (1 + (shift - 1) t)`` (3 for SD3); None = off.
    """
    if num_steps < 1 or not 0.0 < t_init <= 1.0:
        raise ValueError(f"need num_steps >= 1 and 0 < t_init <= 1, got {num_steps}, {t_init}")
    times = [t_init * (1 - i / num_steps) for i in range(num_steps)]
    if shift is not None:
        times = [shift * t / (1 + (shift - 1) * t) for t in times]
    return times


def _step(generator: Denoiser, x_i: Tensor, t_i: float, cond: Cond) -> Tensor:
    t = torch.full((x_i.shape[0],), t_i, device=x_i.device, dtype=x_i.dtype)
    return x0_from_velocity(x_i, generator.velocity(x_i, t, cond).to(x_i.dtype), t)


def sample_generator(
    generator: Denoiser,
    z: Tensor,
    cond: Cond,
    *,
    k: int,
    step_times: Sequence[float],
    noise_type: str = "fresh",
    fresh_noise: Tensor | None = None,
    grad_last: bool = False,
) -> Tensor:
    """Run the first ``k`` steps of the generator sampler; returns ``x_g = D`` after step ``k-1``.

    Args:
        generator: the generator network (conditional only; no CFG).
        z: initial noise ``[B, ...]``.
        cond: conditioning of batch ``B`` (embedded guidance already set by the caller).
        k: number of steps to run, ``1 <= k <= len(step_times)``.
        step_times: the K step times from :func:`generator_step_times`.
        noise_type: ``"fresh"``, ``"fixed"`` or ``"ddim"``.
        fresh_noise: ``[K-1 (or >= k-1), B, ...]`` pre-drawn noise for steps ``1..k-1`` (required by
            ``"fresh"`` when ``k > 1``; draw it keyed, see :func:`draw_fresh_noise`).
        grad_last: run the last step with autograd (generator phase); earlier steps never have it.

    Returns:
        ``x_g`` ``[B, ...]``, the x0-prediction of the last executed step.
    """
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}; choose one of {NOISE_TYPES}")
    if not 1 <= k <= len(step_times):
        raise ValueError(f"k={k} must be in 1..{len(step_times)}")
    if noise_type == "fresh" and k > 1 and (fresh_noise is None or fresh_noise.shape[0] < k - 1):
        raise ValueError(f"noise_type 'fresh' with k={k} needs fresh_noise of shape [>= {k - 1}, B, ...]")
    D = torch.zeros_like(z)
    x_prev, t_prev = z, 1.0
    for i in range(k):
        t_i = float(step_times[i])
        if i == 0:
            noise = z
        elif noise_type == "fresh":
            assert fresh_noise is not None  # checked above for k > 1
            noise = fresh_noise[i - 1].to(z)
        elif noise_type == "fixed":
            noise = z
        else:  # ddim: the noise implied by the previous state, so x_i is an Euler step of the ODE
            noise = eps_from_x0(x_prev, D, torch.full((z.shape[0],), t_prev, dtype=z.dtype, device=z.device))
        x_i = ((1 - t_i) * D + t_i * noise).detach()
        with torch.set_grad_enabled(grad_last and i == k - 1 and torch.is_grad_enabled()):
            D = _step(generator, x_i, t_i, cond)
        x_prev, t_prev = x_i, t_i
    return D


def draw_fresh_noise(
    latent_shape: Sequence[int],
    num_steps: int,
    *,
    seed: int,
    iteration: int,
    stream: str,
    indices: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Keyed fresh noise for steps ``1..K-1``: shape ``[K-1, B, *latent_shape]`` (``K-1 >= 1``)."""
    noise = rng.randn_per_sample(
        (max(num_steps - 1, 1), *latent_shape),
        seed=seed,
        iteration=iteration,
        stream=stream,
        indices=indices,
        device=device,
        dtype=dtype,
    )
    return noise.transpose(0, 1)


@torch.no_grad()
def generate(
    generator: Denoiser,
    cond: Cond,
    latent_shape: Sequence[int],
    *,
    steps: int,
    step_times: Sequence[float],
    noise_type: str = "fresh",
    seed: int = 0,
    indices: Sequence[int] | None = None,
    z: Tensor | None = None,
    fresh_noise: Tensor | None = None,
    batch: int | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Inference, the one student sampler: the first ``steps`` steps of the K-step schedule.

    The 1-step output is the truncated schedule's first x0-prediction, as in training (spec 3.1/3.4).
    Sample ``indices[j]`` (default ``0..N-1``) always gets the same initial noise ``z`` and fresh
    noise for a given ``seed`` (keyed, streams ``sample/z`` and ``sample/fresh``), so images do not
    depend on the batch size.

    Args:
        generator: the trained generator (conditional only; embedded guidance already in ``cond``).
        cond: conditioning of the ``N`` samples.
        latent_shape: per-sample latent shape.
        steps: how many of the K steps to run (``1..K``).
        step_times: the K step times (:func:`generator_step_times`).
        noise_type: ``"fresh"``, ``"fixed"`` or ``"ddim"``.
        seed: keys ``z`` (unless given) and the fresh noise (unless given).
        indices: global sample indices keying the draws.
        z: fixed initial noise ``[N, *latent_shape]`` (e.g. an evaluation set's).
        fresh_noise: fixed fresh noise ``[>= K-1, N, *latent_shape]`` instead of the keyed one.
        batch: samples per network pass (default all ``N``).
        device: where the passes run.

    Returns:
        Latents ``[N, *latent_shape]`` on ``device``.
    """
    n = len(cond)
    indices = list(range(n)) if indices is None else list(indices)
    if z is None:
        z = rng.randn_per_sample(tuple(latent_shape), seed=seed, iteration=0, stream="sample/z", indices=indices)
    batch = batch or max(n, 1)
    out = []
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        if fresh_noise is None:
            fresh = draw_fresh_noise(
                latent_shape,
                len(step_times),
                seed=seed,
                iteration=0,
                stream="sample/fresh",
                indices=indices[lo:hi],
                device=device,
            )
        else:
            fresh = fresh_noise[:, lo:hi].to(device)
        out.append(
            sample_generator(
                generator,
                z[lo:hi].to(device),
                cond.index(slice(lo, hi)).to(device),
                k=steps,
                step_times=step_times,
                noise_type=noise_type,
                fresh_noise=fresh,
            )
        )
    return torch.cat(out)
