"""A small time- and class-conditional MLP denoiser, fitted to an exact teacher by regression.

It plays the role of the pretrained DiT in the toy proof: the fake score and the generator start as
copies of it. Input: the flattened ``x_t``, Fourier features of ``t`` and a learned embedding of the
class label (``C`` classes plus a null class ``C`` for CFG); output: the velocity.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from sidflow.core.denoiser import Cond
from sidflow.core.flow import add_noise, sample_t

__all__ = ["MLPDenoiser", "fit_to_teacher"]


class MLPDenoiser(nn.Module):
    """``v = MLP([x_t, fourier(t), embed(label)])``; its last hidden layer is the SiDA feature."""

    freqs: Tensor  # a registered buffer

    def __init__(
        self, shape: tuple[int, ...], num_classes: int, hidden: int = 128, depth: int = 3, num_freqs: int = 8
    ) -> None:
        super().__init__()
        self.shape, dim = tuple(shape), math.prod(shape)
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32) * math.pi)
        self.embed = nn.Embedding(num_classes + 1, hidden)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * num_freqs, hidden)]
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.velocity_and_features(x_t, t, cond)[0]

    def velocity_and_features(self, x_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        dtype = self.freqs.dtype  # the weights' dtype (float32, or float64 in exact tests)
        x = x_t.reshape(x_t.shape[0], -1).to(dtype)
        ang = t.to(dtype)[:, None] * self.freqs
        h = self.body[0](torch.cat([x, torch.sin(ang), torch.cos(ang)], 1)) + self.embed(cond["label"])
        h = self.body[1:](h)
        v = self.out(h).reshape(x_t.shape).to(torch.promote_types(dtype, torch.float32))
        return v, h


def fit_to_teacher(
    mlp: MLPDenoiser,
    teacher: nn.Module,
    mixture,
    *,
    steps: int = 2000,
    batch: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    drop_prob: float = 0.1,
) -> float:
    """Regress the MLP's velocity onto the exact teacher's at ``x_t`` from mixture data.

    Labels are uniform with probability ``drop_prob`` of the null class; ``t`` is logit-normal(0, 1.6)
    like the SiD losses. Returns the final mean squared x0 error.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    C = mixture.num_classes
    loss = torch.zeros(())
    for _ in range(steps):
        labels = torch.randint(C, (batch,), generator=gen)
        labels = torch.where(torch.rand(batch, generator=gen) < drop_prob, C, labels)
        x0, _ = mixture.sample(labels, gen)
        t = sample_t(batch, mean=0.0, std=1.6, generator=gen)
        x_t = add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        cond = Cond({"label": labels})
        with torch.no_grad():
            v_star = cast(Any, teacher).velocity(x_t, t, cond).float()  # a Denoiser module
        err = (mlp.velocity(x_t, t, cond) - v_star) * t.view(-1, *([1] * (x0.ndim - 1)))
        loss = (err**2).reshape(batch, -1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())
