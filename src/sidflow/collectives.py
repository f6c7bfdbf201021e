"""The collectives the two-phase SiD trainer and the run layer need, all no-ops in one process.

Why hand-written and not DDP: each SiD iteration alternates which network is trained, and the
generator phase back-propagates *through* the fake score and the teacher (their input Jacobians)
while their weights must get no gradient; DDP's per-module gradient hooks would all-reduce the fake
score's (absent) gradients in that phase and need ``find_unused_parameters`` with a toggled trainable
set. So the trainer averages each phase's gradients itself, once, coalesced into a few large
all-reduces (:func:`all_reduce_mean_`, 42x faster than one call per tensor, ``benchmarks/allreduce.py``).
FSDP2-sharded gradients (DTensors) are reduce-scattered by FSDP itself and skipped here.

Every draw is keyed by the *global* sample index (:mod:`sidflow.core.rng`), so rank ``r`` draws
exactly the samples ``r B/world .. (r+1) B/world - 1`` one process would, and the averaged gradient
equals the single-process one up to float summation order (spec 6.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sidflow.errors import ConfigError

__all__ = [
    "is_distributed",
    "barrier",
    "broadcast_object",
    "gather_rows",
    "all_reduce_mean_",
    "broadcast_module_",
    "sum_over_ranks",
    "any_rank",
    "mean_over_ranks",
    "set_gradient_sync",
    "BUCKET_BYTES",
]

BUCKET_BYTES = 256 * 2**20  # coalesced all-reduce bucket (bounds the extra memory)
T = TypeVar("T")


def is_distributed() -> bool:
    """A process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as held by rank ``src`` (any picklable value), on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows(rows: Mapping[str, Tensor], indices: Sequence[int]) -> dict[str, Tensor]:
    """Rows ``name -> [n, ...]`` of the samples ``indices`` held by this rank, concatenated over all
    ranks in the order of the global sample index, on every rank (CPU tensors). One process: ``rows``
    reordered by ``indices``. Used at evaluation points only (an object all-gather, not a hot path).
    """
    if not is_distributed():
        parts = [(list(indices), {k: v.cpu() for k, v in rows.items()})]
    else:
        box: list = [None] * dist.get_world_size()
        dist.all_gather_object(box, (list(indices), {k: v.cpu() for k, v in rows.items()}))
        parts = [p for p in box if p[0]]
    order = torch.tensor([i for idx, _ in parts for i in idx]).argsort()
    names = parts[0][1].keys() if parts else rows.keys()
    return {k: torch.cat([part[k] for _, part in parts])[order] for k in names}


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Consecutive groups of same dtype/device tensors of at most ``bucket_bytes`` (or one tensor)."""
    groups: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for t in tensors:
        if t.is_sparse:
            raise ConfigError("sparse gradients are not supported by the coalesced all-reduce")
        key, nbytes = (t.dtype, t.device), t.numel() * t.element_size()
        if key not in groups or sizes[key] + nbytes > bucket_bytes:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(t)
        sizes[key] += nbytes
    return [bucket for buckets in groups.values() for bucket in buckets if bucket]


def _coalesced_(tensors: Sequence[Tensor], bucket_bytes: int, reduce: bool, src: int = 0) -> None:
    """All-reduce-mean (``reduce``) or broadcast from ``src`` ``tensors`` in place, bucket by bucket."""
    world = dist.get_world_size()
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if reduce:
            dist.all_reduce(flat)
            flat.div_(world)
        else:
            dist.broadcast(flat, src=src)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_mean_(params: Iterable[nn.Parameter], *, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``p.grad`` over ranks in place, coalesced: one all-reduce per dtype bucket.

    Equivalent to ``all_reduce(p.grad); p.grad.div_(world)`` for each parameter (same element-wise
    operations), but with a handful of collectives instead of one per parameter. Parameters without
    a gradient are skipped (every rank must then agree on which ones have none, as with DDP), and
    so are sharded (``DTensor``) gradients: FSDP2 has already reduce-scattered and averaged them.

    Args:
        params: parameters whose ``.grad`` ([*shape], any dense dtype) is averaged.
        bucket_bytes: largest flattened buffer; bounds the transient memory of the copy.
    """
    if not is_distributed():
        return
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    with torch.no_grad():
        _coalesced_(grads, bucket_bytes, reduce=True)


def broadcast_module_(module: nn.Module, src: int = 0, *, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Overwrite ``module``'s parameters and buffers with rank ``src``'s (DDP's sync_module_states)."""
    if not is_distributed():
        return
    seen: set[int] = set()
    tensors = []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen and t.numel():
            seen.add(id(t))
            tensors.append(t.data)
    with torch.no_grad():
        _coalesced_(tensors, bucket_bytes, reduce=False, src=src)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(value: Tensor) -> Tensor:
    """``value`` (a tensor, e.g. a non-finite sample count) summed over ranks, staying a tensor."""
    if not is_distributed():
        return value
    out = value.detach().to(_device()).clone()
    dist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer; a host read: not for hot loops)."""
    if not is_distributed():
        return flag
    return bool(sum_over_ranks(torch.tensor(int(flag), device=_device())).item())


def mean_over_ranks(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Each value averaged over ranks and read on the host (one sync: call it only at log points).

    Each rank's SiD loss is its samples' sum over ``B / world``, so the mean over ranks is the
    global loss, what one process with the whole batch reports.
    """
    keys = list(values)
    device = (
        _device()
        if is_distributed()
        else next((v.device for v in values.values() if isinstance(v, Tensor)), torch.device("cpu"))
    )
    stacked = torch.stack([torch.as_tensor(values[k]).detach().to(device, torch.float64) for k in keys])
    if is_distributed():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))  # host sync (log points only)


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """FSDP2's ``set_requires_gradient_sync`` on every sharded submodule (no-op on unsharded modules).

    ``False`` on all but the last accumulation round (spec 16, FSDP1's ``no_sync``,
    ``train.accumulate=unsharded``): the rounds then accumulate unsharded gradients locally and the
    last backward reduce-scatters their sum once. Left on (``sharded``), every round reduce-scatters
    and the gradients stay sharded.
    """
    if not is_distributed():
        return
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.set_requires_gradient_sync(enabled, recurse=False)


def reshard(*modules: nn.Module) -> None:
    """Free the gathered weights FSDP2 still holds in ``modules`` (``reshard_after_forward=False``).

    Needed when ``requires_grad`` of their parameters changes (the trainer's phase switch): a
    gathered weight keeps the flag it was gathered with. No-op on unsharded modules.
    """
    if not is_distributed():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()
