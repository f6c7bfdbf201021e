"""The contract every teacher, fake score and generator network satisfies.

All of sidflow speaks one time convention (rectified flow, see :mod:`sidflow.core.flow`):
``x_t = (1 - t) x0 + t eps`` with ``t = 1`` pure noise, and every network is seen through its
*velocity* ``v(x_t, t, cond) ~ eps - x0``. The x0-prediction is always derived with
:func:`sidflow.core.flow.x0_from_velocity`, never inside an adapter.

A :class:`Denoiser` is a ``torch.nn.Module`` that *wraps* a model (a diffusers transformer, an MLP,
an analytic Gaussian mixture) and owns everything model-specific: timestep scale, latent packing,
the dtype policy (fp32 in, model dtype inside, fp32 out). CFG is *not* applied by a denoiser; see
:mod:`sidflow.core.guidance`.

:class:`Cond` is the conditioning of a batch. It is opaque to the trainer: a mapping of named
tensors, every one batch-first, that only the adapter that produced it interprets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Cond", "CondSource", "Denoiser", "FeatureDenoiser", "PromptEncoder", "RealSource"]


@dataclass(frozen=True)
class Cond:
    """Batch-first conditioning tensors (prompt embeddings, pooled vectors, masks, class labels).

    Every tensor in ``tensors`` has the batch on dim 0 and the same batch size. ``meta`` carries
    non-batched, hashable settings an adapter needs back (e.g. FLUX's embedded guidance value).
    """

    tensors: Mapping[str, Tensor]
    meta: Mapping[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self.tensors.items()}
        if not sizes:
            raise ValueError("Cond needs at least one tensor")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Cond tensors disagree on the batch size: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def keys(self) -> Iterator[str]:
        return iter(self.tensors)

    @property
    def batch_size(self) -> int:
        return len(self)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def index(self, idx: Tensor | slice | Sequence[int]) -> Cond:
        """Select rows (a slice, an index tensor or a list of row indices)."""
        if isinstance(idx, Sequence) and not isinstance(idx, Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return Cond(
            {k: v[idx.to(v.device) if isinstance(idx, Tensor) else idx] for k, v in self.tensors.items()},
            dict(self.meta),
        )

    def repeat(self, n: int) -> Cond:
        """Tile a batch-of-one conditioning to ``n`` rows (e.g. the empty-prompt encoding)."""
        if len(self) != 1:
            raise ValueError(f"Cond.repeat expects a batch of one, got {len(self)}")
        return Cond({k: v.expand(n, *v.shape[1:]).contiguous() for k, v in self.tensors.items()}, dict(self.meta))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        """Move to ``device``; cast only floating-point tensors to ``dtype`` (masks, ids keep theirs)."""
        out = {}
        for k, v in self.tensors.items():
            cast = dtype if (dtype is not None and v.is_floating_point()) else None
            out[k] = v.to(device=device, dtype=cast)
        return Cond(out, dict(self.meta))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Concatenate along the batch (e.g. ``[uncond; cond]`` for one batched CFG pass)."""
        if not conds:
            raise ValueError("Cond.cat needs at least one Cond")
        keys = list(conds[0].tensors)  # field order follows the first Cond (caches may reorder fields)
        for c in conds[1:]:
            if set(c.tensors) != set(keys):
                raise ValueError(f"Cond.cat: mismatched fields {keys} vs {list(c.tensors)}")
            if dict(c.meta) != dict(conds[0].meta):
                raise ValueError(f"Cond.cat: mismatched meta {dict(conds[0].meta)} vs {dict(c.meta)}")
        return Cond({k: torch.cat([c.tensors[k] for c in conds], dim=0) for k in keys}, dict(conds[0].meta))


@runtime_checkable
class Denoiser(Protocol):
    """A flow-matching network seen in sidflow's convention.

    Implementations are ``torch.nn.Module`` subclasses wrapping the real model, so ``parameters()``,
    ``requires_grad_()``, ``state_dict()`` and ``train()``/``eval()`` behave as usual.
    """

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Velocity ``v ~ eps - x0`` at rectified-flow time ``t``.

        Args:
            x_t: noisy state, shape ``[B, *latent_shape]`` (unpacked latents), any float dtype.
            t: rectified-flow time, shape ``[B]``, in ``[0, 1]``, ``t = 1`` is pure noise.
            cond: conditioning with batch size ``B``.

        Returns:
            ``v`` in float32 (float64 for float64 models) with the shape of ``x_t``.
        """
        ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def requires_grad_(self, requires_grad: bool = True) -> Denoiser: ...


@runtime_checkable
class FeatureDenoiser(Denoiser, Protocol):
    """A :class:`Denoiser` that also exposes discriminator features (SiDA, spec 7.1)."""

    def velocity_and_features(self, x_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """``(v, features)``: the velocity of :meth:`velocity` and the pooled final-norm features
        ``[B, C]`` of the same pass, used as discriminator logits."""
        ...


@runtime_checkable
class PromptEncoder(Protocol):
    """Turns prompts into :class:`Cond` (teacher adapters implement it)."""

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Encode prompts; an empty string gets the unconditional encoding."""
        ...

    def uncond(self, batch_size: int) -> Cond:
        """The unconditional conditioning (the encoding of ``""``), tiled to ``batch_size``."""
        ...


@runtime_checkable
class CondSource(Protocol):
    """Where the trainer's conditioning comes from (prompt lists, class labels, datasets).

    Draws are keyed (see :mod:`sidflow.core.rng`): the prompt of global sample ``i`` at ``iteration``
    for ``stream`` ("fake" or "gen") is the same whatever the micro-batch size or rank count.
    """

    def sample(self, *, seed: int, iteration: int, stream: str, indices: Sequence[int]) -> Cond:
        """Conditioning for the global sample ``indices`` of one iteration (batch ``len(indices)``)."""
        ...

    def uncond(self, batch_size: int) -> Cond:
        """The unconditional conditioning tiled to ``batch_size`` (for CFG's ``[uncond; cond]``)."""
        ...


@runtime_checkable
class RealSource(Protocol):
    """Real latents with their conditioning for SiDA (spec 7), keyed like :class:`CondSource`."""

    def sample(self, *, seed: int, iteration: int, stream: str, indices: Sequence[int]) -> tuple[Tensor, Cond]: ...
