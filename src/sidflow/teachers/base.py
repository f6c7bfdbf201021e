"""The thin helper layer shared by the teacher adapters (spec sections 1.1, 2 and 7.1).

Each family file (``sd3.py``, ``flux.py``, ``sana.py``) is self-contained; this module only holds
what is literally identical between them:

* :class:`TransformerDenoiser`, the ``nn.Module`` base that *wraps* (never subclasses) a diffusers
  transformer and owns the dtype policy (fp32 in and out, the model's dtype inside; fp64 models
  return fp64 so that exactness tests can run in double precision) and the pooled
  final-norm features of spec 7.1 (image tokens after ``norm_out``, before ``proj_out``, averaged
  over tokens; captured by a forward hook on ``norm_out`` so diffusers' own forward is reused);
* :func:`three_networks`, spec 2: frozen teacher psi, trainable fake score phi, trainable generator
  theta, deep-copied from one teacher;
* :class:`LatentCodec`, VAE encode/decode with the model's scaling and shift (spec 2.2/2.3/2.1);
* :class:`TeacherBase`, what every family's teacher object shares: codec, latent shapes, the three
  networks, the teacher's Euler samples and the export as a stock pipeline (spec 15);
* small loading helpers (text-encoder dtype, one-line errors).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from sidflow.core.denoiser import Cond, Denoiser
from sidflow.core.sampling import euler_sample
from sidflow.errors import TeacherLoadError
from sidflow.teachers.lora import AdapterSwitch, LoraSpec, adapter_of, add_adapters

__all__ = [
    "TransformerDenoiser",
    "LatentCodec",
    "three_networks",
    "lora_networks",
    "meta_networks",
    "distinct_transformers",
    "configure_networks",
    "meta_transformer",
    "default_text_encoder_dtype",
    "check_resolution",
    "read_model_index",
    "SIDFLOW_TEACHER_FILE",
    "TeacherBase",
    "prepare_pipeline",
    "check_components",
    "load_component",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

SIDFLOW_TEACHER_FILE = "sidflow_teacher.json"  # optional {"family", "time_scale"} next to model_index


class TransformerDenoiser(nn.Module):
    """Base for the per-family denoisers: holds only the transformer.

    Subclasses implement ``_forward(x, t, cond) -> v_model`` in the model's dtype and layout
    (unpacked ``[B, C, h, w]`` in, velocity of the same shape out) and name the transformer's block
    lists (``fsdp_blocks``, from :mod:`sidflow.teachers.families`).
    """

    fsdp_blocks: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()

    def __init__(self, transformer: nn.Module, time_scale: float) -> None:
        super().__init__()
        self.transformer = transformer
        self.time_scale = float(time_scale)
        # train.precision=amp_bf16: the transformer runs under autocast to this dtype (None: off);
        # inputs, outputs and everything after them stay fp32
        self.autocast_dtype: torch.dtype | None = None
        # LoRA mode (sidflow.teachers.lora): the transformer's adapter switch, and the adapter this
        # view runs with (None: the base, adapters off); None/None outside LoRA mode
        self.lora: AdapterSwitch | None = None
        self.adapter: str | None = None

    def _run(self, x: Tensor, t: Tensor, cond: Cond, out_dtype: torch.dtype) -> Tensor:
        with (
            self.lora.use(self.adapter) if self.lora is not None else nullcontext(),
            torch.autocast(
                x.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
            ),
        ):
            v = self._forward(x, t, cond)
        return v.to(out_dtype)  # precision cast: the model's (autocast) dtype -> fp32

    # ---- LoRA views: each exposes only its own weights (the base, or its adapter) ---------------
    def view(self, adapter: str | None) -> TransformerDenoiser:
        """Another wrapper of this one's transformer (shared, never copied) running ``adapter``."""
        view = copy.deepcopy(self, memo={id(self.transformer): self.transformer, id(self.lora): self.lora})
        view.adapter = adapter
        return view

    def _owns(self, key: str) -> bool:
        return self.lora is None or adapter_of(key) == self.adapter

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, param in super().named_parameters(prefix, recurse, remove_duplicate):
            if self._owns(name):
                yield name, param

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        if self.lora is not None:  # only this view's entries (a `destination` may hold other modules')
            prefix = kwargs.get("prefix", "")
            for key in [k for k in state if k.startswith(prefix) and not self._owns(k)]:
                del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if self.lora is None:
            return super().load_state_dict(state_dict, strict, assign)
        own = set(self.state_dict())
        missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"state dict does not match the {self.adapter or 'base'} weights of this LoRA view: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=assign)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def on_meta(self) -> TransformerDenoiser:
        """This wrapper around a new transformer of the same class and config on the ``meta`` device
        (no memory, no weights; its dtype follows this one's): what shard-first construction builds
        the networks from (:mod:`sidflow.run.sharded`), whatever device this one's weights are on."""
        source = cast(Any, self.transformer)  # a diffusers ModelMixin
        with torch.device("meta"):
            meta = type(source).from_config(dict(source.config))
        meta.to(self.model_dtype)
        # every attribute of the wrapper copied, the transformer replaced (never copied); the copy of a
        # LoRA view is a plain wrapper (adapters are put on the copy by whoever needs them)
        clone = copy.deepcopy(self, memo={id(self.transformer): meta, id(self.lora): None})
        clone.adapter = None
        return clone

    def fsdp_units(self) -> list[nn.Module]:
        """The transformer blocks, each sharded as one FSDP2 unit before the transformer itself."""
        return [block for name in self.fsdp_blocks for block in (getattr(self.transformer, name, None) or ())]

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def _forward(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _prepare(self, x_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor, Cond, torch.dtype]:
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape [B]={[x_t.shape[0]]}, got {list(t.shape)}")
        if len(cond) != x_t.shape[0]:
            raise ValueError(f"cond has batch {len(cond)} but x_t has {x_t.shape[0]}")
        dtype = self.model_dtype
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp64 only for exact tests
        # precision cast: float conds to the model dtype
        return x_t.to(dtype), t.to(out_dtype), cond.to(x_t.device, dtype), out_dtype

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Velocity ``v ~ eps - x0`` at rectified-flow time ``t`` (spec 1).

        Args:
            x_t: unpacked latents ``[B, C, h, w]``, any float dtype.
            t: rectified-flow time ``[B]``, ``t = 1`` is noise.
            cond: conditioning from the teacher's ``encode_prompts``/``uncond`` (batch ``B``).

        Returns:
            fp32 ``v`` shaped like ``x_t`` (fp64 when the model itself is fp64, for exactness tests).
        """
        x, t, cond, out_dtype = self._prepare(x_t, t, cond)
        return self._run(x, t, cond, out_dtype)

    def velocity_and_features(self, x_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """``(v, features)``: :meth:`velocity` plus the pooled final-norm features ``[B, C_inner]``
        (spec 7.1; image tokens after ``norm_out``, averaged over tokens), from the same pass."""
        x, t, cond, out_dtype = self._prepare(x_t, t, cond)
        captured: list[Tensor] = []
        norm_out = cast(nn.Module, self.transformer.norm_out)  # a diffusers submodule
        hook = norm_out.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            v = self._run(x, t, cond, out_dtype)
        finally:
            hook.remove()
        return v, captured[-1].to(out_dtype).mean(dim=1)


def three_networks(
    teacher: TransformerDenoiser,
    trainable_copies: bool = True,
    gradient_checkpointing: bool = False,
    precision: str = "fp32",
    lora: LoraSpec | None = None,
    seed: int = 0,
) -> tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser]:
    """Spec 2: frozen teacher psi, fake score phi and generator theta from one teacher.

    Args:
        teacher: the loaded teacher denoiser; it is frozen in place (``eval``, no grad).
        trainable_copies: deep-copy phi and theta (trainable); False returns the teacher three
            times (inference only, no extra memory).
        gradient_checkpointing: diffusers' gradient checkpointing on all three, the frozen teacher
            included: its activations are kept for the generator phase's backward into its *inputs*
            (the SiD gradient), so recomputing them saves as much as on the trainable two.
        precision: ``"amp_bf16"`` (spec 6.3): the three run under bf16 autocast, the trainable two
            keep fp32 master weights and the frozen teacher is stored in bf16 (half its memory; it
            gets no gradient). ``pure_bf16`` needs nothing here: the pipeline is loaded in bf16.
        lora: LoRA mode (:func:`lora_networks`): adapters on the teacher's own transformer (no copy
            unless ``lora.share_base`` is off), initialised from ``seed``.

    Returns:
        ``(teacher, fake, generator)``.
    """
    if not trainable_copies:
        teacher.eval().requires_grad_(False)
        _set_checkpointing(teacher, gradient_checkpointing)
        return teacher, teacher, teacher
    if lora is not None:
        views = lora_networks(teacher, lora, seed=seed, precision=precision)
        return configure_networks(*views, gradient_checkpointing, precision)
    return configure_networks(
        teacher, copy.deepcopy(teacher), copy.deepcopy(teacher), gradient_checkpointing, precision
    )


def lora_networks(
    teacher: TransformerDenoiser, spec: LoraSpec, *, seed: int = 0, precision: str = "fp32"
) -> tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser]:
    """LoRA mode (:mod:`sidflow.teachers.lora`): the ``fake`` and ``generator`` adapters put on the
    teacher's transformer, and three views of it (teacher: adapters off). ``spec.share_base`` off:
    three full copies, each carrying the adapters, each view on its own copy. The adapters are the
    trainable masters: fp32 (fp64 on an fp64 base, for exactness tests), bf16 under ``pure_bf16``.

    The views share one transformer, so also its train/eval flag: harmless because nothing in these
    DiTs or in the adapters (no LoRA dropout) depends on it, which a dropout option would change."""
    base_dtype = teacher.model_dtype
    dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
    if precision == "pure_bf16":
        dtype = torch.bfloat16
    teacher.lora = add_adapters(teacher.transformer, spec, teacher.fsdp_blocks, seed=seed, dtype=dtype)
    teacher.adapter = None
    if spec.share_base:
        return teacher, teacher.view("fake"), teacher.view("generator")
    fake, generator = copy.deepcopy(teacher), copy.deepcopy(teacher)  # each copy brings its own switch
    fake.adapter, generator.adapter = "fake", "generator"
    return teacher, fake, generator


def meta_networks(
    template: TransformerDenoiser, lora: LoraSpec | None = None, *, seed: int = 0, precision: str = "fp32"
) -> tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser]:
    """Teacher, fake score and generator on the ``meta`` device from ``template``'s class and config
    (shard-first construction and ``sidflow plan``): three wrappers, or in LoRA mode three views of
    one base with the adapters (:func:`lora_networks`; their values come after allocation)."""
    if lora is not None:
        return lora_networks(template.on_meta(), lora, seed=seed, precision=precision)
    return template.on_meta(), template.on_meta(), template.on_meta()


def distinct_transformers(networks: tuple[TransformerDenoiser, ...]) -> list[nn.Module]:
    """Each network's transformer once (LoRA views share one)."""
    found: dict[int, nn.Module] = {}
    for net in networks:
        found.setdefault(id(net.transformer), net.transformer)
    return list(found.values())


def configure_networks(
    teacher: TransformerDenoiser,
    fake: TransformerDenoiser,
    generator: TransformerDenoiser,
    gradient_checkpointing: bool = False,
    precision: str = "fp32",
) -> tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser]:
    """The policy of :func:`three_networks` applied in place to three built networks (also ones on
    the ``meta`` device, before sharding): teacher frozen, the other two trainable, checkpointing,
    and under ``amp_bf16`` autocast on all three with the teacher stored in bf16. LoRA views: only
    their own weights are frozen or trained (the base always frozen), and under ``amp_bf16`` every
    base is stored in bf16 while the adapters keep fp32 masters."""
    teacher.eval().requires_grad_(False)
    for net in (fake, generator):
        net.train().requires_grad_(True)
    for net in (teacher, fake, generator):
        _set_checkpointing(net, gradient_checkpointing)
    if precision == "amp_bf16":
        for net in (teacher, fake, generator):
            net.autocast_dtype = torch.bfloat16
        if teacher.lora is None:
            teacher.to(torch.bfloat16)
        for net in (teacher, fake, generator) if teacher.lora is not None else ():
            for key, param in nn.Module.named_parameters(net):  # every weight, the view's filter aside
                if adapter_of(key) is None:
                    param.data = param.data.to(torch.bfloat16)
    return teacher, fake, generator


def _set_checkpointing(net: TransformerDenoiser, enabled: bool) -> None:
    transformer = cast(Any, net.transformer)  # diffusers ModelMixin methods
    if getattr(transformer, "_supports_gradient_checkpointing", False):
        if enabled:  # LoRA: recompute under the adapter of the forward (sidflow.teachers.lora)
            transformer.enable_gradient_checkpointing(net.lora.checkpoint if net.lora is not None else None)
        elif transformer.is_gradient_checkpointing:
            transformer.disable_gradient_checkpointing()


class LatentCodec:
    """VAE images <-> latents with the model's ``scaling_factor`` and ``shift_factor``.

    ``latent = (z - shift) * scaling`` on encode and ``z = latent / scaling + shift`` on decode;
    SANA's DC-AE has no shift (0). Images are ``[B, 3, H, W]`` in ``[-1, 1]``.
    """

    def __init__(self, vae: nn.Module, sample: bool = True) -> None:
        self.vae = vae
        self.scaling = float(cast(Any, vae).config.scaling_factor)  # a diffusers ConfigMixin attribute
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.sample = sample  # KL VAEs: draw from the posterior (spec 2.2) or take its mean

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> fp32 latents ``[B, C, H/f, W/f]``."""
        dtype = next(self.vae.parameters()).dtype
        out = cast(Any, self.vae).encode(images.to(dtype))  # a diffusers VAE method
        if hasattr(out, "latent_dist"):
            dist = out.latent_dist
            z = dist.sample(generator) if self.sample else dist.mode()
        else:
            z = out.latent
        return ((z.float() - self.shift) * self.scaling).float()

    @torch.no_grad()
    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images -> the posterior's mean and standard deviation in latent space (fp32), so that
        ``mean + std * n`` (``n`` standard normal) is an encoded sample; a deterministic encoder
        (SANA's DC-AE) has ``std = 0``."""
        dtype = next(self.vae.parameters()).dtype
        out = cast(Any, self.vae).encode(images.to(dtype))  # a diffusers VAE method
        if hasattr(out, "latent_dist"):
            mean, std = out.latent_dist.mean.float(), out.latent_dist.std.float()
        else:
            mean = out.latent.float()
            std = torch.zeros_like(mean)
        return (mean - self.shift) * self.scaling, std * self.scaling

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` -> fp32 images in about [-1, 1] (not clamped)."""
        dtype = next(self.vae.parameters()).dtype
        z = latents.float() / self.scaling + self.shift
        return cast(Any, self.vae).decode(z.to(dtype)).sample.float()  # a diffusers VAE method


def default_text_encoder_dtype(device: torch.device | str, requested: torch.dtype | None) -> torch.dtype:
    """bf16 on CUDA (spec 2.1), fp32 on CPU (bf16 is ~24x slower there), unless requested."""
    if requested is not None:
        return requested
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_resolution(resolution: int | tuple[int, int], factor: int, what: str) -> tuple[int, int]:
    """``(H, W)`` after checking both are divisible by ``factor`` (VAE factor x patch size)."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if height <= 0 or width <= 0 or height % factor or width % factor:
        near = max(factor, (height // factor) * factor)
        raise TeacherLoadError(
            f"resolution {height}x{width} is not divisible by {factor} ({what}); "
            f"pick a multiple of {factor}, e.g. {near}"
        )
    return height, width


def read_model_index(folder: Path) -> dict:
    """``model_index.json`` of a local diffusers pipeline folder, or a one-line TeacherLoadError."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise TeacherLoadError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); "
            "point --teacher at a folder saved with save_pretrained or at a hub id"
        )
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise TeacherLoadError(f"{index} is not valid JSON ({err.msg}); re-save the pipeline") from None


def check_components(folder: Path, index: dict, needed: tuple[str, ...]) -> None:
    """One-line error naming the first needed component missing from the folder."""
    for name in needed:
        entry = index.get(name)
        if not entry or entry[0] is None or not (folder / name).is_dir():
            raise TeacherLoadError(
                f"{folder} lacks the '{name}' component that this family needs; "
                "re-save the complete pipeline (save_pretrained) or fix model_index.json"
            )


def load_component(loader: Callable[[], _T], name: str, where: str) -> _T:
    """Run a diffusers/transformers ``from_pretrained`` and turn failures into one line."""
    try:
        return loader()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TeacherLoadError(f"cannot load '{name}' of {where}: {first[:200]}") from None


class TeacherBase:
    """What every family's teacher object shares: VAE codec, latent shapes, the three networks.

    A teacher holds the pipeline (VAE, text encoders, tokenizers, scheduler config) and the teacher
    :class:`TransformerDenoiser`. Subclasses set ``family`` and implement ``encode_prompts`` and
    ``_set_timesteps``.
    """

    family = "?"

    def __init__(
        self,
        pipe,
        denoiser: TransformerDenoiser,
        *,
        name: str,
        device: torch.device | str,
        vae_factor: int,
        token_factor: int,
    ) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.name = name
        self.device = torch.device(device)
        self.vae_factor = int(vae_factor)
        self.token_factor = int(token_factor)  # patch size (SD3, SANA) or the 2x2 packing (FLUX)
        self.codec = LatentCodec(pipe.vae)
        self.text_device = self.device  # where the text encoders sit (CPU once parked)
        self._uncond: Cond | None = None

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    def latent_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """``(C, H/f, W/f)`` of the unpacked latents for an image resolution (one-line error if invalid)."""
        factor = self.vae_factor * self.token_factor
        height, width = check_resolution(
            resolution, factor, f"VAE factor {self.vae_factor} x patch {self.token_factor}"
        )
        return self.latent_channels, height // self.vae_factor, width // self.vae_factor

    def uncond(self, batch_size: int) -> Cond:
        """The encoding of ``""`` (computed once), tiled to ``batch_size``."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond.repeat(batch_size)

    def encode_prompts(self, prompts: list[str]) -> Cond:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, C, H/f, W/f]`` (fp32)."""
        return self.codec.encode(images.to(self.device), generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in about [-1, 1] (fp32)."""
        return self.codec.decode(latents.to(self.device))

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[B, image_channels, H, W]`` in [-1, 1] -> the VAE posterior's ``(mean, std)`` in
        latent space (:meth:`LatentCodec.posterior`), for SiDA's cached real latents."""
        return self.codec.posterior(images.to(self.device))

    @property
    def image_channels(self) -> int:
        """Channels the VAE reads (3; 1 for the bundled grey-digits VAE)."""
        return int(getattr(self.pipe.vae.config, "in_channels", 3))

    def vae_settings(self) -> dict:
        """What determines an image's latents (keys the on-disk latent cache)."""
        config = self.pipe.vae.config
        return {
            "teacher": self.name,
            "vae": type(self.pipe.vae).__name__,
            "dtype": str(next(self.pipe.vae.parameters()).dtype),
            "scaling_factor": float(config.scaling_factor),
            "shift_factor": float(getattr(config, "shift_factor", None) or 0.0),
            "latent_channels": self.latent_channels,
        }

    def make_denoisers(
        self,
        trainable_copies: bool = True,
        gradient_checkpointing: bool = False,
        precision: str = "fp32",
        lora: LoraSpec | None = None,
        seed: int = 0,
    ) -> tuple[TransformerDenoiser, TransformerDenoiser, TransformerDenoiser]:
        """``(teacher, fake, generator)``: see :func:`three_networks`."""
        return three_networks(self.denoiser, trainable_copies, gradient_checkpointing, precision, lora, seed)

    def text_encoders(self) -> list[nn.Module]:
        return [
            m
            for m in (getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
            if m is not None
        ]

    def encoder_settings(self) -> dict:
        """What determines a prompt's embeddings (keys the on-disk embedding cache)."""
        return {
            "teacher": self.name,
            "family": self.family,
            "text_encoder_dtype": sorted({str(next(m.parameters()).dtype) for m in self.text_encoders()}),
            "max_sequence_length": getattr(self, "max_sequence_length", None),
        }

    def move_text_encoders(self, device: torch.device | str) -> None:
        """Park the text encoders (e.g. on CPU once every prompt is cached); encoding still works."""
        for module in self.text_encoders():
            module.to(device)
        self.text_device = torch.device(device)

    def scheduler(self):
        """A fresh ``FlowMatchEulerDiscreteScheduler`` with the pipeline's config (shift included)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(dict(self.pipe.scheduler.config))

    def sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> Tensor:
        """The pipeline's own step times (its shift included), ``[num_steps + 1]`` ending at 0."""
        scheduler = self.scheduler()
        self._set_timesteps(scheduler, num_steps, latent_shape)
        return scheduler.sigmas.float().cpu()

    def _set_timesteps(self, scheduler, num_steps: int, latent_shape: tuple[int, int, int]) -> None:
        scheduler.set_timesteps(num_steps)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        noise: Tensor,
        *,
        num_steps: int,
        guidance_scale: float = 1.0,
        denoiser: Denoiser | None = None,
    ) -> Tensor:
        """The teacher's Euler samples (latents ``[N, C, h, w]``, fp32) from the given initial noise,
        on the pipeline's own step times, with CFG ``guidance_scale`` (spec 5.2, 15); ``denoiser``:
        another copy of the teacher's network to run (e.g. one gathered from FSDP2 shards)."""
        cond = self.encode_prompts(prompts)
        uncond = self.uncond(len(prompts)) if guidance_scale != 1.0 else None
        sigmas = self.sigmas(num_steps, cast("tuple[int, int, int]", tuple(noise.shape[1:])))
        net = denoiser if denoiser is not None else self.denoiser
        return euler_sample(net, noise.to(self.device), sigmas, cond, uncond, guidance_scale)

    def export_pipeline(
        self, generator: TransformerDenoiser, out: Path, *, stochastic_sampling: bool, components: dict | None = None
    ) -> Path:
        """Save ``generator`` as a stock diffusers pipeline of the teacher's own class (spec 15).

        The other components (VAE, text encoders, tokenizers) are the teacher's unless ``components``
        replaces some; the scheduler is ``FlowMatchEulerDiscreteScheduler(shift=1)`` (the generator's
        step times are passed as ``sigmas`` at call time; SANA's own DPM solver would refuse them),
        with ``stochastic_sampling`` for fresh re-noising.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=False, stochastic_sampling=stochastic_sampling
        )
        components = {
            **self.pipe.components,
            **(components or {}),
            "transformer": generator.transformer,
            "scheduler": scheduler,
        }
        type(self.pipe)(**components).save_pretrained(out)
        return out


def meta_transformer(cls: type, source: str | Path, dtype: torch.dtype, hub: dict | None = None) -> nn.Module:
    """The pipeline's transformer built from its ``transformer/config.json`` on the ``meta`` device
    (no weights read): what the ranks other than 0 load under shard-first FSDP2, where only rank 0
    reads the weights (:mod:`sidflow.run.sharded`). ``hub``: revision / token of a hub id."""
    options = {k: v for k, v in (hub or {}).items() if k != "variant"}  # a config has no variants
    config = cast(Any, cls).load_config(str(source), subfolder="transformer", **options)  # diffusers ConfigMixin
    with torch.device("meta"):
        model = cast(Any, cls).from_config(config)
    return model.to(dtype)


def transformer_kwargs(
    cls: type, source: str | Path, dtype: torch.dtype, transformer_device: str | None, hub: dict | None = None
) -> dict:
    """``from_pretrained`` keywords: the hub settings (``revision``, ``variant``, ``token``,
    ``local_files_only``), and a meta-device transformer when asked."""
    options = dict(hub or {})
    if transformer_device == "meta":
        options["transformer"] = meta_transformer(cls, source, dtype, hub)
    return options


def prepare_pipeline(
    pipe, device: torch.device | str, text_encoder_dtype: torch.dtype | None, transformer_device: str | None = None
) -> None:
    """Move a loaded pipeline to ``device``, cast its text encoders, freeze VAE and text encoders.

    ``transformer_device``: None moves the transformer with the rest; ``"cpu"`` keeps its weights in
    host memory and ``"meta"`` leaves a weightless one (shard-first FSDP2, :mod:`sidflow.run.sharded`).
    """
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module) and not (name == "transformer" and transformer_device is not None):
            component.to(device)
    te_dtype = default_text_encoder_dtype(device, text_encoder_dtype)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.to(dtype=te_dtype).requires_grad_(False)
    pipe.vae.requires_grad_(False)
