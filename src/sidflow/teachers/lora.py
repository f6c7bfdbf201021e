"""LoRA mode: one frozen base transformer, the fake score and the generator two peft adapters on it.

The reference holds three full copies of the DiT (teacher psi, fake score phi, generator theta) and
two Adam states. With ``lora.rank > 0`` sidflow holds one base transformer, frozen, and puts two
named peft LoRA adapters on it, ``"fake"`` and ``"generator"``; the teacher is the base with adapters
disabled. Adapters start with ``B = 0``, so both trainable networks start as the teacher, as the
full copies do. The trainer and its maths do not change: the three
:class:`~sidflow.teachers.base.TransformerDenoiser` objects stay three *views* of one transformer,
each naming the adapter it runs with (None: the teacher), and each exposing only its own weights
(``parameters()``, ``state_dict()``): the teacher view the base, an adapter view its adapter. So the
optimisers, the EMA, the checkpoints and the trainer's "trainable, not shared with the teacher"
rule all see exactly what they see with full copies, only smaller.

Adapter switching (spec 16). A view switches the shared layers to its adapter for the length of its
forward (:class:`AdapterSwitch`; peft's own ``set_adapter`` would also flip ``requires_grad``, which the
trainer owns, so the switch sets the layers' active adapter directly). Gradient checkpointing
recomputes a forward during backward, *after* the other views have switched the layers: diffusers'
default checkpoint function would then recompute the teacher's and the fake score's passes of the
generator phase under the wrong adapter, and the gradients would be silently wrong. sidflow passes
its own checkpoint function (:meth:`AdapterSwitch.checkpoint`), which records the adapter state at
forward time and restores it around the recompute (``torch.utils.checkpoint``'s ``context_fn``).
``lora.critic_checkpointing=off`` instead recomputes only the generator's passes (the teacher's and
the fake score's keep their activations): the alternative the issue asked to measure
(``benchmarks/lora_memory.py``).

``lora.share_base=off`` keeps three full copies, each with the adapters (a LoRA product with memory
to spare); the same views, weights and checkpoint layout.

Exports: :func:`fused_transformer` (the generator's adapter merged into a copy of the base with
diffusers' ``fuse_lora``, then ``unload_lora``: diffusers drops the weights of an active adapter
on ``save_pretrained`` otherwise) and :func:`diffusers_lora_state` (the adapter alone, keyed as a
pipeline's ``load_lora_weights`` reads it).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from sidflow.config import LoraConfig
from sidflow.core import rng
from sidflow.errors import ConfigError

__all__ = [
    "ADAPTERS",
    "LoraSpec",
    "lora_spec",
    "AdapterSwitch",
    "target_modules",
    "add_adapters",
    "init_adapters_",
    "adapter_of",
    "is_adapter_key",
    "diffusers_lora_state",
    "fused_transformer",
    "copy_sharing_base",
    "adapter_config",
]

ADAPTERS = ("fake", "generator")
# peft names a LoRA weight ``<module>.lora_A.<adapter>.weight`` (and lora_B)
_KEY = re.compile(r"\.lora_(?:A|B)\.([^.]+)\.")


@dataclass(frozen=True)
class LoraSpec:
    """What ``lora.*`` asks for: rank, alpha and the module-name suffixes it targets inside the
    transformer's blocks; ``critic_checkpointing`` as the module docstring."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    share_base: bool = True
    critic_checkpointing: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_spec(config: LoraConfig, family_targets: tuple[str, ...]) -> LoraSpec | None:
    """The run's ``lora.*`` settings with the family's defaults filled in (None: ``lora.rank=0``)."""
    if config.rank == 0:
        return None
    return LoraSpec(
        rank=config.rank,
        alpha=float(config.alpha if config.alpha is not None else config.rank),
        targets=tuple(config.targets or family_targets),
        share_base=config.share_base == "on",
        critic_checkpointing=config.critic_checkpointing == "recompute",
    )


def adapter_of(key: str) -> str | None:
    """The adapter a parameter or state-dict key belongs to (None: a base weight)."""
    found = _KEY.search(key)
    return found.group(1) if found else None


def is_adapter_key(key: str, adapter: str | None) -> bool:
    """Whether ``key`` is a weight of ``adapter`` (None: of the base)."""
    return adapter_of(key) == adapter


def target_modules(transformer: nn.Module, blocks: tuple[str, ...], suffixes: tuple[str, ...]) -> list[str]:
    """Full names of the layers LoRA goes on: ``nn.Linear`` (and ungrouped ``nn.Conv2d``) modules inside
    the transformer's block lists whose name ends with one of ``suffixes`` (so a top-level layer with a
    block layer's name, e.g. FLUX's final ``proj_out``, is never hit)."""
    names = []
    for name, module in transformer.named_modules():
        if not name.startswith(tuple(f"{b}." for b in blocks)):
            continue
        linear = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
        if linear and any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    if not names:
        raise ConfigError(
            f"lora.targets={','.join(suffixes)} matches no linear layer in the transformer's blocks; "
            "name attention/MLP projections such as to_q,to_k,to_v,to_out.0"
        )
    return names


def adapter_config(spec: LoraSpec, targets: list[str]):
    """The peft ``LoraConfig`` of one adapter (no dropout, no bias: SiD's maths sees a plain function)."""
    from peft import LoraConfig

    alpha: Any = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha  # peft types it int; floats work
    return LoraConfig(r=spec.rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")


def add_adapters(
    transformer: nn.Module,
    spec: LoraSpec,
    blocks: tuple[str, ...],
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> AdapterSwitch:
    """Put the ``fake`` and ``generator`` adapters on ``transformer`` (frozen first), initialise them
    (:func:`init_adapters_`, keyed by ``seed``: every rank and every run gets the same), cast them to
    ``dtype`` (the trainable dtype: fp32 masters, bf16 under pure_bf16) and install the switch."""
    transformer.requires_grad_(False)  # (diffusers' add_adapter then trains the last one added:
    # configure_networks sets each view's flags afterwards)
    targets = target_modules(transformer, blocks, spec.targets)
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in ADAPTERS:
            cast(Any, transformer).add_adapter(adapter_config(spec, targets), adapter_name=name)  # diffusers mixin
    for key, param in transformer.named_parameters():
        if adapter_of(key) is not None:
            param.data = param.data.to(dtype)
    switch = AdapterSwitch(transformer, critic_checkpointing=spec.critic_checkpointing)
    if not any(p.is_meta for p in transformer.parameters()):
        init_adapters_(transformer, seed)
    return switch


@torch.no_grad()
def init_adapters_(transformer: nn.Module, seed: int) -> None:
    """Keyed LoRA initialisation, the same on every rank whatever the sharding: ``A`` uniform in
    ``+-1/sqrt(fan_in)`` (peft's Kaiming default), drawn on the CPU from a generator keyed by
    ``(seed, parameter name)``; ``B = 0``, so each adapter starts as the identity. Sharded (DTensor)
    weights keep their own piece of the full draw."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for key, param in transformer.named_parameters():
        if adapter_of(key) is None:
            continue
        shape = tuple(param.shape)
        if ".lora_B." in key:
            full = torch.zeros(shape)
        else:
            bound = 1.0 / math.prod(shape[1:]) ** 0.5
            g = rng.keyed_generator(seed, "lora", key)
            full = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
        if isinstance(param, DTensor):
            local = param.to_local()
            piece = distribute_tensor(
                full.to(local.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
            )
            local.copy_(piece.to_local())
        else:
            param.copy_(full)


class _Using:
    """``AdapterSwitch.use(adapter)`` as a context that can be entered more than once (torch's
    checkpoint enters its recompute context once per backward through the checkpointed block)."""

    def __init__(self, switch: AdapterSwitch, adapter: str | None) -> None:
        self.switch, self.adapter = switch, adapter
        self.previous: list[str | None] = []

    def __enter__(self) -> None:
        self.previous.append(self.switch.active)
        self.switch._apply(self.adapter)

    def __exit__(self, *exc: Any) -> None:
        self.switch._apply(self.previous.pop())


class AdapterSwitch:
    """Which adapter the LoRA layers of one transformer run with, set per forward by the views.

    ``use(name)`` (None: adapters off, the teacher) is a context: the previous state comes back on
    exit. :meth:`checkpoint` is the gradient-checkpointing function diffusers calls per block.
    """

    def __init__(self, transformer: nn.Module, *, critic_checkpointing: bool = True) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        self.critic_checkpointing = critic_checkpointing
        self.active: str | None = "generator"  # peft's state after add_adapter: the last one added, on
        self._apply("fake")
        if any(layer.active_adapters != ["fake"] or layer.disable_adapters for layer in self.layers):
            raise RuntimeError(  # the switch writes peft's per-layer state directly (see _apply)
                "this peft version keeps the active adapter elsewhere; install the peft release pinned in "
                "sidflow's requirements"
            )
        self._apply(None)

    def _apply(self, adapter: str | None) -> None:
        for layer in self.layers:  # peft's own set_adapter would also change requires_grad
            layer._disable_adapters = adapter is None
            if adapter is not None:
                layer._active_adapter = [adapter]
        self.active = adapter

    @contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        previous = self.active
        if adapter != previous:
            self._apply(adapter)
        try:
            yield
        finally:
            if self.active != previous:
                self._apply(previous)

    def _contexts(self, adapter: str | None) -> tuple[AbstractContextManager, AbstractContextManager]:
        # forward as is; every recompute of it (one per backward through it) under the same adapter
        return nullcontext(), _Using(self, adapter)

    def checkpoint(self, module: nn.Module, *args: Any) -> Any:
        """diffusers' ``gradient_checkpointing_func``: non-reentrant checkpointing whose recompute runs
        under the adapter state of the forward; with ``critic_checkpointing`` off, only the
        generator's passes are checkpointed (the teacher's and fake score's keep their activations)."""
        adapter = self.active
        if not self.critic_checkpointing and adapter != "generator":
            return module(*args)
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=partial(self._contexts, adapter)
        )


def diffusers_lora_state(tensors: dict[str, Tensor], adapter: str = "generator") -> dict[str, Tensor]:
    """An adapter's weights (keys as a view's ``state_dict``: ``transformer.<module>.lora_A.<adapter>.weight``)
    keyed as diffusers' ``save_lora_weights(transformer_lora_layers=...)`` takes them
    (``<module>.lora_A.weight``)."""
    out = {}
    for key, value in tensors.items():
        if adapter_of(key) != adapter:
            continue
        name = key.removeprefix("transformer.").replace(f".{adapter}.", ".", 1)
        out[name] = value.detach().to("cpu").contiguous()
    if not out:
        raise ConfigError(f"no weights of the {adapter!r} adapter to export")
    return out


def copy_sharing_base(module: nn.Module) -> nn.Module:
    """A copy of a network for other weights of it (the EMA, kept snapshots): in LoRA mode its own
    adapter weights over the *same* base tensors (the base is never copied); otherwise a deep copy."""
    memo: dict[int, Any] = {}
    if getattr(module, "lora", None) is not None:
        named = [*nn.Module.named_parameters(module), *module.named_buffers()]  # every weight, no view filter
        memo = {id(t): t for key, t in named if adapter_of(key) is None}
    return copy.deepcopy(module, memo)


@torch.no_grad()
def fused_transformer(transformer: nn.Module, adapter: str = "generator") -> nn.Module:
    """A new fp32 model in host memory with ``adapter`` merged into the base weights and every LoRA
    layer removed (diffusers' ``fuse_lora`` then ``unload_lora``): a plain model of the stock class.

    Built on ``meta`` and filled tensor by tensor from ``transformer`` (whose base stays untouched and
    where it is, e.g. on the GPU), so the only new full copy is the host one; merged in fp32, so a
    bf16 base does not round the small LoRA update away."""
    source = cast(Any, transformer)
    with torch.device("meta"):
        fused = cast(Any, type(source).from_config(dict(source.config)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        fused.add_adapter(copy.deepcopy(source.peft_config[adapter]), adapter_name=adapter)
    fused.to_empty(device="cpu").to(torch.float32)
    values = {k: v for k, v in source.state_dict().items() if adapter_of(k) in (None, adapter)}
    target = fused.state_dict()
    if set(values) != set(target):
        raise ConfigError(f"cannot merge the {adapter!r} adapter: {sorted(set(values) ^ set(target))[:3]} differ")
    for key, value in values.items():
        target[key].copy_(value.detach().to("cpu", torch.float32))
    live = dict(source.named_buffers())
    for name, buffer in fused.named_buffers():  # non-persistent ones are not in the state dict
        buffer.copy_(live[name].detach().to("cpu", buffer.dtype))
    fused.fuse_lora(adapter_names=[adapter])
    fused.unload_lora()
    return fused.eval()
