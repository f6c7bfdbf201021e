"""Optimisers of the two SiD networks, by precision mode (``train.precision``, spec 6.2-6.3).

* ``fp32`` and ``amp_bf16``: ``torch.optim.Adam`` on fp32 master weights (under ``amp_bf16`` the
  networks compute in bf16 through autocast or FSDP2's ``MixedPrecisionPolicy``; weights, gradients
  and Adam moments stay fp32).
* ``pure_bf16``: the weights themselves are bf16 (half the memory), as in the reference's pure-bf16
  mode with its Adam ``eps = 1e-4`` and value clipping at 1. Plain Adam on bf16 weights loses every
  update smaller than half a bf16 ulp of the weight (8 significant bits): at lr 5e-6 a weight of 0.02
  never moves. :class:`StochasticRoundingAdam` computes the Adam step in fp32 and rounds the new
  weight to bf16 *stochastically* (up with probability equal to the remainder's share of the ulp), so
  the expected weight follows the fp32 trajectory and small updates survive on average.

Written here rather than taken from torchao, whose bf16 stochastic-rounding AdamW is a private class
(``torchao.optim._AdamW``) compiled with ``torch.compile`` on first use (minutes on a CPU). The
rounding noise is drawn from a generator seeded by ``(seed, step)``, so runs replay exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sidflow.core import rng

__all__ = [
    "Precision",
    "PRECISIONS",
    "resolve_precision",
    "stochastic_round_to_bf16",
    "StochasticRoundingAdam",
    "make_optimizer",
]

Precision = Literal["fp32", "amp_bf16", "pure_bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "amp_bf16", "pure_bf16")


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """``"auto"``: ``amp_bf16`` on CUDA, ``fp32`` elsewhere (bf16 is ~24x slower on CPUs)."""
    if precision == "auto":
        return "amp_bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return precision  # type: ignore[return-value]  # checked against PRECISIONS above


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round fp32 ``x`` to bf16, up or down with probabilities proportional to the distance.

    bf16 keeps the top 16 bits of the fp32 bit pattern: adding a uniform random integer in
    ``[0, 2^16)`` to the pattern and truncating the low 16 bits rounds up exactly when the random
    number exceeds what truncation would drop, i.e. with probability ``remainder / ulp``.
    """
    x = x.float().contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device="cpu").to(x.device)
    bits = (x.view(torch.int32) + noise) & -65536  # -65536 == 0xFFFF0000 as int32: clear the low 16 bits
    rounded = bits.view(torch.float32)
    # the top-16-bit pattern is exactly representable: the cast is exact; non-finite values pass through
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


class StochasticRoundingAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba; no weight decay) for bf16 weights with fp32 moments and stochastic rounding.

    Args:
        params: the bf16 parameters.
        lr, betas, eps: as ``torch.optim.Adam``.
        seed, stream: key the rounding noise (with the step count and the parameter's index).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        seed: int = 0,
        stream: str = "bf16_round",
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.seed, self.stream = int(seed), str(stream)
        # each parameter's step count on the host (``state["step"]`` is its checkpointed tensor
        # copy, read once after a load): the bias corrections and the rounding key need an int, and
        # reading it from the tensor every step is a host read (a data-dependent one under fake
        # tensors, sidflow plan)
        self._host_steps: dict[int, int] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._host_steps.clear()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    self._host_steps[id(p)] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                step = self._host_steps.get(id(p))
                if step is None:
                    step = int(state["step"])  # once per parameter after a load: a CPU scalar
                state["step"] += 1
                step += 1
                self._host_steps[id(p)] = step
                grad = p.grad.float()
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
                update = state["exp_avg"] / (1 - beta1**step) / denom
                new = p.float() - group["lr"] * update
                gen = rng.keyed_generator(self.seed, step, self.stream, index)
                p.copy_(stochastic_round_to_bf16(new, gen) if p.dtype == torch.bfloat16 else new.to(p.dtype))


def make_optimizer(
    params: list[nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    precision: Precision,
    seed: int,
    stream: str,
) -> torch.optim.Optimizer:
    """Adam for ``fp32``/``amp_bf16``; :class:`StochasticRoundingAdam` for ``pure_bf16`` (its rounding
    noise keyed by ``(seed, step, stream, parameter index)``)."""
    if precision == "pure_bf16":
        return StochasticRoundingAdam(params, lr=lr, betas=betas, eps=eps, seed=seed, stream=stream)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
