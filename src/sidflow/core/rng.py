"""Keyed random draws: every random number depends only on (seed, iteration, stream, sample index).

SiD's results must not depend on the micro-batch size or on the number of ranks. So no draw ever
comes from a stateful global RNG: each sample's latent ``z``, noise ``eps``, time ``t``, per-step
fresh noise and prompt index come from a ``torch.Generator`` seeded by a hash of
``(seed, iteration, stream, global sample index)``, and per-iteration draws (the step count ``k``)
from ``(seed, iteration, stream)``. Splitting a batch of 32 into 4 rounds of 8, or over 4 ranks,
therefore reproduces exactly the same tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["key_seed", "keyed_generator", "randn_per_sample", "randint_per_sample", "randint_keyed", "choice_keyed"]


def key_seed(*key: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(*key: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded from ``key``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(key_seed(*key))
    return gen


def _per_sample(
    fn, shape: Sequence[int], seed: int, iteration: int, stream: str, indices: Sequence[int], device, dtype
) -> Tensor:
    # Drawn on CPU then moved: CPU generators are bit-identical across machines, CUDA ones are not
    # guaranteed to match the CPU stream. The cost is one host->device copy per batch.
    rows = [fn(tuple(shape), generator=keyed_generator(seed, iteration, stream, int(i)), dtype=dtype) for i in indices]
    return torch.stack(rows).to(device)


def randn_per_sample(
    shape: Sequence[int],
    *,
    seed: int,
    iteration: int,
    stream: str,
    indices: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal draws of per-sample ``shape``, stacked to ``[len(indices), *shape]``.

    ``indices`` are *global* sample indices within the iteration (0..global_batch-1).
    """
    return _per_sample(torch.randn, shape, seed, iteration, stream, indices, device, dtype)


def randint_per_sample(
    high: int, *, seed: int, iteration: int, stream: str, indices: Sequence[int], device: torch.device | str = "cpu"
) -> Tensor:
    """One integer in ``[0, high)`` per sample, shape ``[len(indices)]`` (e.g. a prompt index)."""
    vals = [int(torch.randint(high, (1,), generator=keyed_generator(seed, iteration, stream, int(i)))) for i in indices]
    return torch.tensor(vals, dtype=torch.long, device=device)


def randint_keyed(low: int, high: int, *, seed: int, iteration: int, stream: str) -> int:
    """One integer in ``[low, high]`` (inclusive) per iteration, e.g. the step count ``k``.

    Every rank computes the same value from the same key, so no broadcast is needed.
    """
    gen = keyed_generator(seed, iteration, stream)
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def choice_keyed(weights: Sequence[float], *, seed: int, iteration: int, stream: str) -> int:
    """One index in ``[0, len(weights))`` drawn with probability proportional to ``weights``.

    Keyed like :func:`randint_keyed`: every rank draws the same index without a broadcast.
    """
    probs = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if probs.numel() == 0 or bool((probs < 0).any()) or float(probs.sum()) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return int(torch.multinomial(probs, 1, generator=keyed_generator(seed, iteration, stream)))
