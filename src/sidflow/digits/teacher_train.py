"""Rectified-flow training of the bundled teacher's transformer on VAE latents of the digits.

Rectified flow / flow matching (Liu et al., 2023; Lipman et al., 2023; SD3: Esser et al., 2024):
``x_t = (1 - t) x0 + t eps``, the network predicts the velocity ``v = eps - x0`` at
``timestep = 1000 t``, with ``t`` drawn logit-normal(0, 1) as in SD3. Each digit is paired with one
of its class's five phrasings at random; 10 % of prompts are replaced by the empty prompt so the
teacher also learns the unconditional velocity used by classifier-free guidance. The shipped weights
are an exponential moving average (EMA) of the trained ones.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import cast

import torch
from diffusers import SD3Transformer2DModel

__all__ = ["RFConfig", "train_rectified_flow"]


@dataclass(frozen=True)
class RFConfig:
    """Teacher training hyper-parameters (``minutes``, when set, replaces ``steps`` as the length)."""

    steps: int = 3000  # optimiser steps (batch ``batch``)
    minutes: float | None = None  # if set: train for this wall time; the schedule follows elapsed time
    batch: int = 64
    lr: float = 5e-4  # AdamW peak learning rate (linear warm-up, cosine decay to 0)
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # prompt dropout for classifier-free guidance
    seed: int = 0


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over ``progress`` in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _logit_normal(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=gen))


def _draw_batch(
    z_mean: torch.Tensor, z_std: torch.Tensor, labels: torch.Tensor, phrasings: int, cfg: RFConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch: posterior-sampled ``x0`` [B, 4, 16, 16], prompt rows [B] (empty prompt with
    probability ``p_uncond``), logit-normal ``t`` [B] and ``eps`` [B, 4, 16, 16]."""
    idx = torch.randint(0, len(labels), (cfg.batch,), generator=gen)
    x0 = z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=gen)
    rows = labels[idx] * phrasings + torch.randint(0, phrasings, (cfg.batch,), generator=gen)
    drop = torch.rand(cfg.batch, generator=gen) < cfg.p_uncond
    rows = torch.where(drop, torch.full_like(rows, 10 * phrasings), rows)
    t = _logit_normal(cfg.batch, gen)
    eps = torch.randn(x0.shape, generator=gen)
    return x0, rows, t, eps


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1 - decay)


def train_rectified_flow(
    transformer: SD3Transformer2DModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    cfg: RFConfig,
    *,
    progress: bool = True,
) -> tuple[SD3Transformer2DModel, dict]:
    """Train ``transformer`` as a rectified-flow velocity model; return its EMA copy and a log.

    Args:
        transformer: the MMDiT to train (modified in place).
        latents: (mean, std) of the normalised posterior latents, each ``[N, 4, 16, 16]``; a fresh
            posterior sample ``mean + std * n`` is drawn per use.
        labels: ``[N]`` digit classes.
        prompt_embeds: ``[10 * P + 1, L, D]``: class ``c`` phrasing ``p`` at row ``c * P + p``; the
            last row is the empty prompt.
        pooled: ``[10 * P + 1, D_pooled]``, rows as ``prompt_embeds``.
        cfg: hyper-parameters.
        progress: show a tqdm bar.

    Returns:
        The EMA transformer (eval mode, no grad) and ``{"steps", "seconds", "final_loss", ...}``.
    """
    from tqdm.auto import tqdm

    z_mean, z_std = latents
    phrasings = (prompt_embeds.shape[0] - 1) // 10
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    transformer.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    budget = None if cfg.minutes is None else 60.0 * cfg.minutes
    bar = tqdm(
        total=cfg.steps if budget is None else round(budget),
        desc="teacher",
        disable=not progress,
        unit="it" if budget is None else "s",
    )
    start, ema_loss, step, done = time.perf_counter(), None, 0, 0.0
    while done < 1.0:
        x0, rows, t, eps = _draw_batch(z_mean, z_std, labels, phrasings, cfg, gen)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        v = transformer(
            hidden_states=x_t,
            encoder_hidden_states=prompt_embeds[rows],
            pooled_projections=pooled[rows],
            timestep=1000 * t,
        ).sample
        loss = (v - (eps - x0)).square().mean()
        for group in opt.param_groups:  # the cosine runs over the part of the run after warm-up
            group["lr"] = cfg.lr * _lr_factor(step, done, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        _ema_update(ema, transformer, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        elapsed = time.perf_counter() - start
        # progress: by steps, or by wall time when a budget in minutes is given (robust to a shared CPU)
        done = step / cfg.steps if budget is None else elapsed / budget
        bar.update(1 if budget is None else min(round(elapsed), bar.total) - bar.n)
        img_s = step * cfg.batch / elapsed
        bar.set_postfix(loss=f"{ema_loss:.4f}", img_s=f"{img_s:.0f}")
    bar.close()
    transformer.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    log = {
        "steps": step,
        "batch": cfg.batch,
        "seconds": round(seconds, 1),
        "final_loss": round(cast(float, ema_loss), 5),
        "images_seen": step * cfg.batch,
    }
    return ema, log
