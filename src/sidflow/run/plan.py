"""``sidflow plan``: the per-GPU memory of a run, measured on one SiD iteration of the true-size networks.

No weights and no GPU are needed. The teacher's transformer is built from its config (a shipped
public config for a hub id, the folder's own ``transformer/config.json`` otherwise) and the run is
simulated for rank 0 of ``world_size`` ranks:

* a fake process group (``torch.testing._internal.distributed.fake_pg``) of ``world_size`` ranks
  stands in for NCCL: collectives are no-ops, so every tensor keeps its true shape;
* under ``torch._subclasses.FakeTensorMode`` every tensor has a shape, dtype and size but no data,
  so a 12 B-parameter model costs nothing to build;
* the three networks come from the run's own construction (shard-first FSDP2,
  :func:`~sidflow.run.sharded.build_sharded_networks`, or the unsharded copies of one process) and
  one iteration runs through the run's own :class:`~sidflow.trainer.SiDTrainer`: both phases, both
  optimiser steps and the EMA, with ``k = K`` generator steps (the worst case) and CFG as configured;
* torch's own trackers measure it: ``FSDPMemTracker`` (sharded) or ``MemTracker`` (unsharded),
  from ``torch.distributed._tools``; the breakdown is taken at the peak.

What the simulation cannot see, and how it is accounted for:

* attention: on this CPU ``scaled_dot_product_attention`` dispatches to the fused flash kernel
  (``_scaled_dot_product_flash_attention_for_cpu``), under fake tensors as with real ones, whose
  memory is the output and the log-sum-exp, as for the fused kernels a GPU runs (flash,
  memory-efficient, cuDNN): no ``S x S`` score matrix is counted. A GPU that falls back to the math
  path would need more;
* the two values the trainer reads on the host (``k`` and the non-finite count) have no data under
  fake tensors: ``k`` is set to ``K`` and the count to 0;
* the rounds of gradient accumulation repeat the same work: two rounds are simulated (the second
  sees what the first left: accumulated gradients), not ``R``;
* tensors outside the networks: the VAE stays on the GPU (counted from its parameter count), the
  text encoders leave it once every prompt is cached (counted unless ``data.cache_dir`` is set or
  the prompt file has at most ``data.cache_size`` prompts); the CUDA context, NCCL buffers and
  allocator fragmentation are a fixed ``overhead_gib``;
* the generator EMA is counted as optimiser state;
* under ``train.cpu_offload=on`` the parameters, gradients and optimiser state at the peak are
  reported as ``host_offloaded_gib`` and left out of the GPU peak (the unit copied to the GPU to be
  gathered is counted with the all-gather buffers); an approximation: the GPU-only peak may fall at
  another moment than the tracked one;
* it measures training: rank 0's evaluation and export add a gathered generator (bf16 under
  ``amp_bf16``) after the optimiser state is freed at the end, and during training next to it.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from sidflow.config import SiDConfig
from sidflow.core.denoiser import Cond
from sidflow.errors import ConfigError, SidflowError
from sidflow.optim import resolve_precision
from sidflow.run.registry import resolve_prompts, resolve_teacher_path
from sidflow.run.sharded import build_sharded_networks
from sidflow.teachers.base import TransformerDenoiser, configure_networks, distinct_transformers, meta_networks
from sidflow.teachers.configs import TeacherSpec, count_params, meta_model, resolve_spec
from sidflow.teachers.describe import example_cond, latent_shape
from sidflow.teachers.families import get_family
from sidflow.teachers.lora import lora_spec

__all__ = ["plan", "teacher_spec", "OVERHEAD_GIB", "CATEGORIES", "format_plan"]

GIB = 2**30
OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, caching-allocator fragmentation: not tensors
# breakdown key -> the trackers' reference types (FSDPMemTracker's and MemTracker's names)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "parameters": ("Sharded Param", "Parameter", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Gradient"),
    "optimizer_state": ("OptState", "Optstate"),
    "activations": ("Activation", "Inputs"),
    "temporaries": ("Temp", "Other"),
    "all_gather_buffers": ("Unsharded Param", "All Gather"),
    "reduce_scatter_buffers": ("Reduce Scatter",),
}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def teacher_spec(path: str) -> TeacherSpec:
    """The architecture of ``teacher.path``: a shipped config (hub id, registered name) or a folder."""
    return resolve_spec(resolve_teacher_path(path))


class _Conds:
    """Zero conditioning of the true shapes: the plan's prompt source (cached prompts, no encoder)."""

    def __init__(self, spec: TeacherSpec, max_sequence_length: int | None) -> None:
        self.spec, self.tokens = spec, max_sequence_length

    def sample(self, *, seed: int, iteration: int, stream: str, indices: Sequence[int]) -> Cond:
        return example_cond(self.spec, len(indices), self.tokens)

    def uncond(self, batch_size: int) -> Cond:
        return example_cond(self.spec, batch_size, self.tokens)


def _global_peak_only(self, peak_state) -> None:
    """The trackers' ``_update_peak_stats`` without the per-module peaks (only the job-wide one is
    read; the per-module loop over every tracked module costs as much as the op itself)."""
    from copy import deepcopy

    for dev, snap in self._curr_mem_snap.items():
        total = snap["Total"]
        if self._peak_mem.get(dev, 0) < total:
            self._peak_mem[dev] = total
            self._peak_mem_snap[dev] = deepcopy(snap)


def _fsdp_tracker(roots: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
    """``FSDPMemTracker`` over several FSDP roots and every optimizer (it takes one of each), whose
    roots may be called several times per iteration (it refuses a second top-level call, to keep
    per-module statistics apart; only the job-wide peak is read here, so they are reset instead)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    class _Tracker(FSDPMemTracker):
        def __init__(self) -> None:
            super().__init__(roots[0], None)
            self._root_mod = nn.ModuleList(roots)  # type: ignore[assignment]  # all three networks

        _update_peak_stats = _global_peak_only

        def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig_fsdp_state_pre_fw)

            def pre_forward(*args, **kwargs):
                if not self._mod_tracker.is_bw:
                    self.memory_tracking.pop(fsdp_mod, None)  # per-module stats of an earlier call
                return inner(*args, **kwargs)

            return pre_forward

        def _instrument_optimizer(self) -> None:  # every optimizer, as MemTracker does
            for optimizer in optimizers:  # the state they already hold
                self._track_optimizer_states(_FSDPRefType.OPT, optimizer)

            def pre(optimizer, args, kwargs) -> None:
                self._in_opt = True

            def post(optimizer, args, kwargs) -> None:
                self._track_optimizer_states(_FSDPRefType.OPT, optimizer)
                self._in_opt = False

            self._optimizer_hook_handles = (
                register_optimizer_step_pre_hook(pre),
                register_optimizer_step_post_hook(post),
            )

    return _Tracker(), _FSDPRefType.OPT


def _breakdown(snapshot: dict) -> dict[str, float]:
    """Bytes by breakdown key from one device's tracker snapshot (the peak)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for key, value in snapshot.items():
        name = getattr(key, "value", key)
        for category, names in CATEGORIES.items():
            if name in names:
                out[category] += float(value)
    return out


def _prompt_count(config: SiDConfig) -> int | None:
    """How many prompts ``data.prompts`` holds (any format), or None when it cannot be read here."""
    try:
        return len(resolve_prompts(config.data.prompts, config.data.prompt_column))
    except SidflowError:
        return None


def _aux_bytes(spec: TeacherSpec, config: SiDConfig, precision: str) -> tuple[float, float, bool]:
    """(VAE bytes, text-encoder bytes on the GPU, whether the text encoders are offloaded)."""
    comps = spec["components"]
    vae_bytes = 2 if precision == "pure_bf16" else _BYTES[config.teacher.dtype]  # loaded with the transformer
    vae = count_params(meta_model(*comps["vae"])) * vae_bytes
    text = sum(count_params(meta_model(*comps[k])) for k in comps if k.startswith("text_encoder")) * 2  # bf16
    count = _prompt_count(config)
    offloaded = config.data.cache_dir is not None or (count is not None and count <= config.data.cache_size)
    return float(vae), 0.0 if offloaded else float(text), offloaded


def plan(
    config: SiDConfig,
    *,
    world_size: int,
    gpu_memory_gib: float = 80.0,
    fake: bool = True,
    overhead_gib: float = OVERHEAD_GIB,
) -> dict[str, Any]:
    """Peak memory per GPU of one SiD iteration of ``config`` on ``world_size`` ranks (rank 0).

    Args:
        config: the run (teacher, resolution, precision, batch per GPU, sharding, memory levers).
        world_size: GPUs; FSDP2 shards over them when ``train.sharding=fsdp2`` and more than one.
        gpu_memory_gib: the GPU's memory, for ``fits``.
        fake: simulate under ``FakeTensorMode`` (False: real CPU tensors, to check the simulation;
            only for tiny teachers).
        overhead_gib: fixed non-tensor memory added to the tracked peak.

    Returns:
        ``{"peak_gib_per_rank", "fits", "breakdown_gib", "tracked_peak_gib", "setup", "notes", ...}``.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 1:
        raise ConfigError(f"--world-size {world_size} must be at least 1")
    if dist.is_initialized():
        raise ConfigError("sidflow plan simulates its own process group; run it outside torchrun")
    start = time.perf_counter()
    tc = config.train
    precision = resolve_precision(tc.precision, "cuda")  # a plan is for GPUs: auto -> amp_bf16
    sharded = tc.sharding == "fsdp2" and world_size > 1
    rounds = tc.batch // (world_size * tc.batch_gpu)
    if tc.batch % (world_size * tc.batch_gpu):
        raise ConfigError(
            f"train.batch={tc.batch} is not a multiple of world size {world_size} x train.batch_gpu="
            f"{tc.batch_gpu}; pick a train.batch_gpu or --world-size that divides it"
        )
    # rounds repeat the same work; what one leaves to the next is its gradients: full ones under
    # unsharded accumulation (two rounds are simulated), sharded ones otherwise (one round is, and
    # the gradients the later rounds start with are added to the peak, see _tracked_step)
    simulated_rounds = min(rounds, 2) if tc.accumulate == "unsharded" else 1
    run_config = dataclasses.replace(
        config,
        train=dataclasses.replace(tc, precision=precision, batch=world_size * tc.batch_gpu * simulated_rounds),
    )
    spec = teacher_spec(config.teacher.path)
    family = get_family(spec["family"])
    module = importlib.import_module(f"sidflow.teachers.{family.module}")
    shape = latent_shape(spec, config.data.resolution)
    dtype = torch.bfloat16 if precision == "pure_bf16" else getattr(torch, config.teacher.dtype)
    time_scale = config.teacher.time_scale if config.teacher.time_scale is not None else family.time_scale
    template = module.DENOISER(meta_model(*spec["components"]["transformer"]).to(dtype), time_scale)
    checkpointing = config.teacher.gradient_checkpointing == "on"

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))  # outside the fake mode
        tracked = _iteration(
            template,
            mesh,
            run_config,
            spec,
            shape,
            precision,
            checkpointing,
            sharded,
            fake,
            world_size,
            rounds_after_first=rounds > simulated_rounds,
        )
    finally:
        dist.destroy_process_group()

    vae, text, offloaded = _aux_bytes(spec, config, precision)
    breakdown = {k: v / GIB for k, v in tracked.items()}
    host_gib = 0.0
    if sharded and tc.cpu_offload == "on":
        # CPUOffloadPolicy keeps the shards, their gradients and the Adam state in host memory; the
        # simulation (all on one device) counts them at the peak: they are moved out of the GPU sum
        for key in ("parameters", "gradients", "optimizer_state"):
            host_gib += breakdown[key]
            breakdown[key] = 0.0
    breakdown["vae"] = vae / GIB
    breakdown["text_encoders"] = text / GIB
    breakdown["overhead"] = overhead_gib
    peak = sum(breakdown.values())
    return {
        "teacher": config.teacher.path,
        "family": spec["family"],
        "world_size": world_size,
        "resolution": config.data.resolution,
        "latent_shape": list(shape),
        "setup": {
            "precision": precision,
            "sharding": "fsdp2" if sharded else "none",
            "batch_gpu": tc.batch_gpu,
            "gradient_checkpointing": config.teacher.gradient_checkpointing,
            "lora": ({"rank": config.lora.rank, "share_base": config.lora.share_base} if config.lora.rank else "off"),
            "reshard_after_forward": tc.reshard_after_forward,
            "cpu_offload": tc.cpu_offload,
            "accumulate": tc.accumulate,
            "k": config.generator.num_steps,
            "rounds": rounds,
            "simulated_rounds": simulated_rounds,
            "text_encoders_offloaded": offloaded,
        },
        "gpu_memory_gib": gpu_memory_gib,
        "peak_gib_per_rank": peak,
        "tracked_peak_gib": sum(tracked.values()) / GIB,
        "host_offloaded_gib": host_gib,
        "fits": peak <= gpu_memory_gib,
        "breakdown_gib": breakdown,
        "simulated": "fake tensors" if fake else "real tensors",
        "seconds": time.perf_counter() - start,
    }


def _iteration(
    template,
    mesh,
    config: SiDConfig,
    spec: TeacherSpec,
    shape: tuple[int, int, int],
    precision: str,
    checkpointing: bool,
    sharded: bool,
    fake: bool,
    world_size: int,
    *,
    rounds_after_first: bool = False,
) -> dict[str, float]:
    """Build the networks and the trainer, run one iteration under the tracker; bytes by category.

    The networks are built on ``meta`` and sharded outside the fake mode; their shards are allocated,
    and everything after runs, inside it (``fake``). LoRA mode (``lora.rank``): the three are views
    of one base with two adapters, as the run builds them."""
    from torch._subclasses import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    device = torch.device("cpu")
    lora = lora_spec(config.lora, template.lora_targets)
    if sharded:
        networks = build_sharded_networks(
            template,
            mesh,
            device,
            precision=precision,
            gradient_checkpointing=checkpointing,
            reshard_after_forward=config.train.reshard_after_forward == "on",
            cpu_offload=config.train.cpu_offload == "on",
            fill=False,
            allocation=mode,
            lora=lora,
        )
    else:
        networks = configure_networks(*meta_networks(template, lora, precision=precision), checkpointing, precision)
        with mode:
            for transformer in distinct_transformers(networks):
                transformer.to_empty(device=device)
    with mode:
        return _tracked_step(networks, config, spec, shape, sharded, fake, world_size, device, rounds_after_first)


def _tracked_step(
    networks: tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser],
    config: SiDConfig,
    spec: TeacherSpec,
    shape: tuple[int, int, int],
    sharded: bool,
    fake: bool,
    world_size: int,
    device: torch.device,
    rounds_after_first: bool,
) -> dict[str, float]:
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from sidflow.trainer import SiDTrainer

    if not fake:  # real tensors: values that keep the iteration finite (they do not change its memory)
        with torch.no_grad():
            for net in networks:
                for p in net.parameters():
                    p.normal_(0.0, 0.02)
    conds = _Conds(spec, config.teacher.max_sequence_length)
    trainer = SiDTrainer(*networks, conds, shape, config, device, rank=0, world_size=world_size)
    # fake tensors carry no values: the two host reads become the worst case and "all finite"
    num_steps = config.generator.num_steps
    cast(Any, trainer).k_for = lambda iteration: num_steps
    cast(Any, trainer)._check_nonfinite = lambda phase, bad: 0
    _allocate_optimizer_state(trainer)
    if sharded:
        roots = distinct_transformers(networks)
        tracker, opt_type = _fsdp_tracker(roots, [trainer.opt_fake, trainer.opt_gen])
    else:

        class _Tracker(MemTracker):  # repeated top-level calls, as for FSDPMemTracker above
            def _pre_fw_hook(self, module, inputs) -> None:
                if not self._mod_tracker.is_bw:
                    self.memory_tracking.pop(module, None)
                super()._pre_fw_hook(module, inputs)

            _update_peak_stats = _global_peak_only

            def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
                # gradient hooks only where gradients can exist (not on the frozen teacher)
                hooks = self._param_to_grad_hook_handles
                install = install_grad_hooks and all(
                    q.requires_grad or hooks.get(q) is not None for q in module.parameters()
                )
                return super()._track_module_params_and_buffers(module, install)

        tracker = _Tracker()
        tracker.track_external(*networks, trainer.opt_fake, trainer.opt_gen)
        opt_type = _MemRefType.OPT
    with tracker:
        for value in (trainer.ema or {}).values():  # the EMA is training state beside the optimizers
            tracker._update_and_maybe_create_winfos(value, opt_type)
        trainer.step()
    snapshots = tracker.get_tracker_snapshot("peak")
    snapshot = snapshots.get(device) or next(iter(snapshots.values()))
    breakdown = _breakdown(snapshot)
    if rounds_after_first:  # later rounds hold the whole sharded gradient of their network throughout
        held = max(
            sum(p.numel() * p.element_size() for p in _local(params))
            for params in (trainer.fake_params, trainer.gen_params)
        )
        breakdown["gradients"] = max(breakdown["gradients"], float(held))
    return breakdown


def _local(params):
    """This rank's pieces of (possibly FSDP2-sharded) parameters."""
    from torch.distributed.tensor import DTensor

    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


def _allocate_optimizer_state(trainer) -> None:
    """The Adam moments as in every iteration after the first (which creates them midway): one
    step on zero gradients allocates them and moves no weight (a zero update)."""
    for optimizer in (trainer.opt_fake, trainer.opt_gen):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a few human-readable lines."""
    s = result["setup"]
    lines = [
        f"{result['teacher']} ({result['family']}) at {result['resolution']} px on {result['world_size']} GPU(s): "
        f"{s['precision']}, sharding {s['sharding']}, batch/GPU {s['batch_gpu']}, checkpointing "
        f"{s['gradient_checkpointing']}, reshard {s['reshard_after_forward']}, offload {s['cpu_offload']}, "
        f"k={s['k']}",
        f"peak per GPU: {result['peak_gib_per_rank']:.1f} GiB of {result['gpu_memory_gib']:g} -> "
        + ("fits" if result["fits"] else "does NOT fit"),
    ]
    for key, value in result["breakdown_gib"].items():
        lines.append(f"  {key:<24}{value:8.2f} GiB")
    lines.append(
        f"({result['simulated']}, {s['simulated_rounds']} of {s['rounds']} accumulation rounds, "
        f"{result['seconds']:.0f} s; text encoders {'off the GPU' if s['text_encoders_offloaded'] else 'on the GPU'})"
    )
    return "\n".join(lines)
