"""Process-group set-up under ``torchrun`` and FSDP2 orchestration (spec 6.1, 16).

``init_from_env`` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and picks NCCL on ``cuda:LOCAL_RANK`` when CUDA is present, else
gloo on the CPU. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) it is a no-op single process.
The collectives themselves (gradient averaging, broadcasts) live in :mod:`sidflow.collectives`.

FSDP2 (``train.sharding=fsdp2``): :func:`shard_networks` applies ``fully_shard`` to each of the
adapter's FSDP units (its transformer blocks, named in :mod:`sidflow.teachers.families`) and then to
the transformer; :func:`gather_state` gathers sharded tensors one at a time (the generator kept
beside each checkpoint) and :func:`shard_state_like` re-shards a single-file checkpoint of the older
format on resume (checkpoints are written shard by shard with ``torch.distributed.checkpoint``, see
:mod:`sidflow.run.checkpoint`); :func:`gather_into_` fills rank 0's unsharded copy of the generator for
evaluation and export. Note that transformers' ``save_pretrained`` writes nothing on ranks other than
0 once a process group exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sidflow.collectives import is_distributed
from sidflow.errors import ConfigError

__all__ = [
    "DistContext",
    "init_from_env",
    "shutdown",
    "shard_networks",
    "gather_state",
    "shard_state_like",
    "gather_into_",
    "fsdp_mesh",
    "TIMEOUT_ENV",
]

TIMEOUT_ENV = "SIDFLOW_DIST_TIMEOUT_MIN"  # collective timeout; rank 0 evaluates while the others wait
_DEFAULT_TIMEOUT_MIN = 120.0
_LAUNCH = "launch with 'torchrun --nproc_per_node N -m sidflow.cli distill ...'"


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes.
        local_rank: rank on this node (selects ``cuda:local_rank``).
        device: this process's compute device.
        backend: ``"nccl"``, ``"gloo"`` or None (single process, no group).
        owns_group: True when :func:`init_from_env` created the group (so :func:`shutdown` ends it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs, evaluates and exports."""
        return self.rank == 0


def _env_int(env: dict[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise ConfigError(f"WORLD_SIZE is set but {name} is not; {_LAUNCH}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer; launch with torchrun") from None


def _device_for(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
            "visible; lower --nproc_per_node or fix CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _timeout(env: dict[str, str]) -> timedelta:
    raw = env.get(TIMEOUT_ENV, str(_DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of minutes") from None
    return timedelta(minutes=minutes)


def init_from_env(env: dict[str, str] | None = None) -> DistContext:
    """Join the ``torchrun`` job described by ``env`` (default ``os.environ``).

    Returns the existing group's context if one is already initialised (``owns_group=False``);
    a single-process context on ``cuda`` (if available) or ``cpu`` when ``WORLD_SIZE`` is unset or 1.

    Raises:
        ConfigError: a torchrun variable is missing or malformed, or LOCAL_RANK has no GPU.
    """
    env = dict(os.environ if env is None else env)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(env.get("LOCAL_RANK", rank))
        device = _device_for(local) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistContext(rank, world, local, device, dist.get_backend(), owns_group=False)
    world = int(env["WORLD_SIZE"]) if env.get("WORLD_SIZE") else 1
    if world <= 1:
        return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
    if not env.get("MASTER_ADDR"):
        raise ConfigError(f"WORLD_SIZE is set but MASTER_ADDR is not; {_LAUNCH}")
    _env_int(env, "MASTER_PORT")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}; launch with torchrun")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; unset WORLD_SIZE to run one process")
    device = _device_for(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=_timeout(env), **extra)
    return DistContext(rank, world, local, device, backend, owns_group=True)


def shutdown(ctx: DistContext | None = None) -> None:
    """End the process group (only one :func:`init_from_env` created, when ``ctx`` is given)."""
    if ctx is not None and not ctx.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- FSDP2 (spec 16) -------------------------------------------------------------------------
def shard_networks(
    teacher: nn.Module,
    fake: nn.Module,
    generator: nn.Module,
    mesh=None,
    *,
    reshard_after_forward: bool = True,
    bf16_params: bool = False,
    cpu_offload: bool = False,
) -> None:
    """FSDP2-shard the three networks in place: each transformer block, then the transformer (root).

    Each network is a :class:`~sidflow.teachers.base.TransformerDenoiser` whose ``velocity`` calls
    ``self.transformer(...)`` and whose ``fsdp_units()`` are its blocks; the transformer is the FSDP
    root, so its ``forward`` all-gathers the non-block parameters. Gradients of the trainable
    networks are then reduce-scattered and averaged by FSDP itself (the trainer must not all-reduce
    them again). Networks that share parameter objects (e.g. ``trainable_copies=False``) are sharded
    once. Shard before building the :class:`~sidflow.trainer.SiDTrainer`, so that its optimizers hold
    the sharded parameters.

    Args:
        teacher, fake, generator: the networks, on their compute device, with a ``.transformer``.
        mesh: a 1-D :class:`~torch.distributed.device_mesh.DeviceMesh` (default: all ranks).
        reshard_after_forward: free the gathered weights after each forward (FULL_SHARD).
        bf16_params: ``train.precision=amp_bf16``: all-gather and compute in bf16, reduce-scatter
            gradients in fp32 (``MixedPrecisionPolicy``); the fp32 shards stay the master weights.
        cpu_offload: the shards, their gradients and the optimizer state live in host memory
            (``CPUOffloadPolicy``, pinned on CUDA); each unit is copied to the device to be gathered.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if bf16_params:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())

    done: set[int] = set()
    for net in (teacher, fake, generator):
        root = getattr(net, "transformer", None)
        if root is None:
            raise ConfigError(f"{type(net).__name__} has no .transformer to shard; FSDP needs a pipeline teacher")
        if id(root) in done:
            continue
        done.add(id(root))
        for block in cast(Any, net).fsdp_units():  # a TransformerDenoiser method, not an nn.Module one
            fully_shard(block, **kw)
        fully_shard(root, **kw)


def fsdp_mesh(device: torch.device):
    """The 1-D device mesh of all ranks on ``device``'s type (``cuda`` under NCCL, ``cpu`` under gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def _full(value: Tensor, device: torch.device | str | None) -> Tensor:
    """The whole of a (possibly sharded) tensor; a shard offloaded to the host (FSDP2 CPU offload)
    is gathered on the mesh's device, since an NCCL group cannot gather host tensors."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        local, mesh = value.to_local(), value.device_mesh
        if local.device.type != mesh.device_type:
            on_mesh = local.to(mesh.device_type if mesh.device_type != "cuda" else torch.cuda.current_device())
            value = DTensor.from_local(
                on_mesh, mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
            )
        value = value.full_tensor()
    return value if device is None else value.to(device)


def gather_state(
    state: dict[str, Any], *, device: torch.device | str | None = None, rank0_only: bool = False
) -> dict[str, Any]:
    """A trainer state dict (``{"tensors", "scalars"}``) with every sharded tensor gathered in full.

    Collective under FSDP2: every rank must call it; rank 0 then writes the checkpoint.

    Args:
        state: :meth:`~sidflow.trainer.SiDTrainer.state_dict` of a (possibly FSDP2-sharded) trainer.
        device: where each gathered tensor goes as soon as it is gathered (``"cpu"``: the full state
            never sits on the GPU at once); None keeps it where the all-gather left it.
        rank0_only: other ranks drop each gathered tensor at once and get no tensors back.
    """
    keep = not rank0_only or not is_distributed() or dist.get_rank() == 0
    tensors = {}
    for key, value in state["tensors"].items():
        full = _full(value, device)
        if keep:
            tensors[key] = full
    return {"tensors": tensors, "scalars": state["scalars"]}


def gather_into_(module: nn.Module | None, state: dict[str, Tensor], device: torch.device | str | None = None) -> None:
    """Copy ``state`` (sharded or not) into ``module`` tensor by tensor; ``module`` None: only gather.

    Collective under FSDP2: every rank calls it, rank 0 (say) with its unsharded module and the
    others with None, so at most one full tensor is alive at a time on the other ranks. ``device``:
    where each gathered tensor goes before the copy (``"cpu"``: streamed through host memory).

    Raises:
        ConfigError: the keys of ``state`` and ``module``'s state dict differ.
    """
    target = module.state_dict() if module is not None else None
    if target is not None and set(target) != set(state):
        raise ConfigError(f"state and module disagree on keys, e.g. {sorted(set(target) ^ set(state))[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            full = _full(value, device)
            if target is not None:
                target[key].copy_(full)


def shard_state_like(state: dict[str, Any], trainer) -> dict[str, Any]:
    """Full checkpoint tensors re-sharded like the live FSDP2 ``trainer``'s networks and optimizers.

    Network tensors take the placement of the trainer's own state-dict entry; optimizer moments
    (``optim_<name>/<pid>/<key>``, pid = position in the optimizer's param groups, as torch numbers
    them) take their parameter's, since a fresh optimizer has no state to copy it from. Anything
    else (scalars, unknown keys: the trainer reports those) passes through.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    like: dict[str, Tensor] = dict(trainer.state_dict()["tensors"])
    for name, opt in (("optim_fake", trainer.opt_fake), ("optim_gen", trainer.opt_gen)):
        params = [p for group in opt.param_groups for p in group["params"]]
        like.update({f"{name}/{pid}": p for pid, p in enumerate(params)})
    tensors = {}
    for key, value in state["tensors"].items():
        ref = like.get(key, like.get(key.rsplit("/", 1)[0]) if key.startswith("optim_") else None)
        if isinstance(ref, DTensor) and not isinstance(value, DTensor) and tuple(value.shape) == tuple(ref.shape):
            value = distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
        tensors[key] = value
    return {"tensors": tensors, "scalars": state["scalars"]}
