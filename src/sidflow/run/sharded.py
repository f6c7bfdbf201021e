"""Shard-first construction of the three networks under FSDP2, and the generator gathered on demand.

Spec 2 and 16. No rank ever holds a full copy of a network it trains with:

1. every rank builds the teacher, the fake score and the generator on the ``meta`` device from the
   teacher's transformer config (:meth:`~sidflow.teachers.base.TransformerDenoiser.on_meta`: no
   memory, no weights) and applies the run's policy to them (freezing, checkpointing, bf16 autocast
   and bf16 teacher storage, :func:`~sidflow.teachers.base.configure_networks`);
2. they are FSDP2-sharded, each transformer block then the transformer
   (:func:`~sidflow.run.distributed.shard_networks`), with the run's memory levers;
3. ``to_empty`` allocates this rank's shards only, on the compute device (or host memory under CPU
   offload);
4. :func:`fill_from_` streams the teacher's weights in, one tensor at a time: rank 0, the only rank
   that read them (into host memory, ``load_teacher(transformer_device="cpu")``; the others built
   theirs on ``meta``), broadcasts each tensor and every rank keeps its own piece of it, for all three
   networks at once.

Evaluation, grids and export use :func:`gathered_generator`: a fresh unsharded copy of the (EMA)
generator on rank 0 (in bf16 under ``amp_bf16``, the weights it computes with), filled tensor by
tensor through host memory (each full tensor exists on the device only while it is being gathered)
and dropped by the caller when it is done with it; nothing is kept between evaluations.
``sidflow plan`` (:mod:`sidflow.run.plan`) builds its networks with the
same :func:`build_sharded_networks` under fake tensors (``fill=False``: they carry no values).
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sidflow.run.distributed import gather_into_, shard_networks
from sidflow.teachers.base import configure_networks, distinct_transformers, lora_networks, meta_networks
from sidflow.teachers.lora import LoraSpec, init_adapters_

if TYPE_CHECKING:
    from sidflow.teachers.base import TransformerDenoiser
    from sidflow.trainer import SiDTrainer

__all__ = ["build_sharded_networks", "fill_from_", "gathered_generator"]

Networks = tuple["TransformerDenoiser", "TransformerDenoiser", "TransformerDenoiser"]


def build_sharded_networks(
    template: TransformerDenoiser,
    mesh,
    device: torch.device | str,
    *,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    fill: bool = True,
    allocation: AbstractContextManager | None = None,
    lora: LoraSpec | None = None,
    seed: int = 0,
) -> Networks:
    """``(teacher, fake, generator)`` built on ``meta``, sharded, then materialised shard by shard.

    Args:
        template: the teacher's denoiser: weights in host memory on rank 0, on ``meta`` elsewhere
            (only its class, config and, on rank 0, its values are read).
        mesh: the 1-D device mesh of all ranks (:func:`~sidflow.run.distributed.fsdp_mesh`).
        device: this rank's compute device.
        precision, gradient_checkpointing: as :func:`~sidflow.teachers.base.three_networks`.
        reshard_after_forward, cpu_offload: FSDP2 memory levers (``train.*``).
        fill: copy the teacher's values in (False: ``sidflow plan``, whose tensors are fake).
        allocation: a context the shards are allocated in (``sidflow plan``: ``FakeTensorMode``).
        lora, seed: LoRA mode (:mod:`sidflow.teachers.lora`): the three are views of one base,
            sharded once (``lora.share_base`` off: three copies), the adapters initialised from
            ``seed`` after the fill, each rank its own piece of the same keyed draw.
    """
    meta = meta_networks(template, lora, seed=seed, precision=precision)
    networks = configure_networks(*meta, gradient_checkpointing, precision)
    shard_networks(
        *networks,
        mesh,
        reshard_after_forward=reshard_after_forward,
        bf16_params=precision == "amp_bf16",
        cpu_offload=cpu_offload,
    )
    with allocation or nullcontext():
        for transformer in distinct_transformers(networks):
            transformer.to_empty(device=device)  # this rank's shards (FSDP2 moves them to the host under offload)
    if fill:
        fill_from_(template, networks, mesh)
        for transformer in distinct_transformers(networks) if lora is not None else ():
            init_adapters_(transformer, seed)
    return networks


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name (non-persistent buffers too: ``to_empty`` left them blank), by
    the plain model's names: a layer LoRA wraps keeps its weights under ``base_layer`` (peft)."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {name.replace(".base_layer.", "."): value for name, value in named.items()}


@torch.no_grad()
def fill_from_(template: TransformerDenoiser, networks: Networks | tuple[nn.Module, ...], mesh, src: int = 0) -> None:
    """Copy ``template``'s transformer (on rank ``src``) into every network's transformer, in place.

    Collective: each tensor is broadcast once from ``src`` on the mesh's device and every rank copies
    its own shard of it (``distribute_tensor(..., src_data_rank=None)`` slices locally, FSDP2's
    layout) into each network, cast to that network's dtype. Replicated tensors (buffers) are copied
    whole. At most one full tensor is alive at a time on any rank.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    rank = dist.get_rank() if dist.is_initialized() else src
    comm_device = torch.device(mesh.device_type) if mesh is not None else torch.device("cpu")
    if comm_device.type == "cuda":
        comm_device = torch.device("cuda", torch.cuda.current_device())
    targets = [_tensors(transformer) for transformer in distinct_transformers(cast(Networks, networks))]
    for name, source in _tensors(cast(nn.Module, template.transformer)).items():
        if rank == src:
            full = source.detach().to(comm_device)
        else:
            full = torch.empty(source.shape, dtype=source.dtype, device=comm_device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(full, src)
        for tensors in targets:
            target = tensors[name]  # (the LoRA weights are not the teacher's: init_adapters_ fills them)
            if isinstance(target, DTensor):
                piece = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(piece.to_local())
            else:
                target.copy_(full)
        del full


def gathered_generator(
    trainer: SiDTrainer,
    template: TransformerDenoiser | None,
    *,
    ema: bool = True,
    lora: LoraSpec | None = None,
    teacher: bool = False,
):
    """Ranks given a ``template`` (rank 0; every rank for a rank-sharded evaluation): a fresh
    unsharded copy of the trainer's (EMA) generator on the compute device, for evaluation and export
    (``teacher=True``: of the frozen teacher, for an evaluation's teacher reference); the others:
    None. Collective: every rank must call it.

    The copy is built on ``meta`` from ``template`` (rank 0's teacher denoiser: same class and
    config), allocated in host memory, filled tensor by tensor (each sharded tensor gathered, moved
    to the host and dropped from the device before the next), then moved to the device whole. The
    caller drops it when done: no copy stays resident between evaluations. LoRA mode (``lora``): the
    copy is the base (gathered from the teacher view) with the generator's adapter on it, a view.
    """
    generator = cast(nn.Module, trainer.teacher if teacher else trainer.generator)
    state: dict[str, Tensor] = dict(generator.state_dict())
    if ema and trainer.ema is not None and not teacher:
        state.update(trainer.ema)
    clone = base = None
    if template is not None:
        # amp_bf16: the weights it computes with (bf16), half the memory of the fp32 masters
        autocast = cast(Any, generator).autocast_dtype
        clone = template.on_meta().to(autocast or cast(Any, trainer.teacher).model_dtype)
        clone.autocast_dtype = autocast
        if lora is not None:
            base, _, clone = lora_networks(
                clone, dataclasses.replace(lora, share_base=True), precision=trainer.precision
            )
            clone = base if teacher else clone
        clone.transformer.to_empty(device="cpu")
        clone.requires_grad_(False).eval()
        # replicated buffers: the generator's (the teacher's are bf16-cast under amp); LoRA: the shared base's
        live_buffers = dict(cast(nn.Module, trainer.teacher if lora is not None else generator).named_buffers())
        with torch.no_grad():
            for name, buffer in clone.named_buffers():  # replicated; non-persistent ones are not in `state`
                buffer.copy_(live_buffers[name])
    if lora is not None:  # the shared base, from the teacher view's shards
        gather_into_(base, cast(nn.Module, trainer.teacher).state_dict(), device="cpu" if base is not None else None)
    if lora is None or not teacher:  # (the LoRA teacher is the base itself)
        gather_into_(clone, state, device="cpu" if clone is not None else None)
    return None if clone is None else clone.to(trainer.device)
