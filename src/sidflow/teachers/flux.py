"""FLUX.1-dev teacher (spec 1.1, 2.3, 10.3).

``FluxTransformer2DModel`` predicts the rectified-flow velocity on *packed* latents: sidflow keeps
latents unpacked ``[B, 16, h, w]`` and packs only around the transformer call,
``[B, C, h, w] -> [B, (h/2)(w/2), 4C]`` (2x2 patches, channel-major inside a patch), with image
position ids ``(0, row, col)`` and all-zero text ids. The transformer takes ``timestep = t`` and
multiplies it (and the embedded guidance) by 1000 itself, so ``time_scale = 1``. FLUX-dev is
guidance-distilled: the *embedded* guidance value is a model input read from
``cond.meta["embedded_guidance"]`` (default: the denoiser's ``embedded_guidance``, 1.0); it is
ignored for checkpoints without a guidance embedder (FLUX-schnell). Text: T5 last hidden state
(512 tokens, or fewer where ``tokenizer_2`` says so) -> ``prompt_embeds [B, 512, 4096]``, CLIP-L
pooled -> ``pooled_prompt_embeds [B, 768]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from sidflow.core.denoiser import Cond
from sidflow.core.guidance import EMBEDDED_GUIDANCE_KEY
from sidflow.teachers.base import (
    TeacherBase,
    TransformerDenoiser,
    load_component,
    prepare_pipeline,
    transformer_kwargs,
)
from sidflow.teachers.defaults import with_defaults
from sidflow.teachers.families import FAMILIES

__all__ = ["FluxDenoiser", "FluxTeacher", "load", "pack_latents", "unpack_latents", "image_ids"]

NEEDED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def pack_latents(x: Tensor) -> Tensor:
    """``[B, C, h, w] -> [B, (h/2)(w/2), 4C]``: 2x2 patches, row-major over patches."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]``."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h_tokens: int, w_tokens: int, device, dtype) -> Tensor:
    """Position ids ``[(h/2)(w/2), 3]``: channel 0 = 0, channel 1 = row, channel 2 = column."""
    rows = torch.arange(h_tokens).view(-1, 1).expand(h_tokens, w_tokens)
    cols = torch.arange(w_tokens).view(1, -1).expand(h_tokens, w_tokens)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxDenoiser(TransformerDenoiser):
    """Wraps ``FluxTransformer2DModel``: packing, position ids, embedded guidance."""

    fsdp_blocks = FAMILIES["flux"].fsdp_blocks
    lora_targets = FAMILIES["flux"].lora_targets

    def __init__(
        self, transformer: nn.Module, time_scale: float = FAMILIES["flux"].time_scale, embedded_guidance: float = 1.0
    ) -> None:
        super().__init__(transformer, time_scale)
        self.embedded_guidance = float(embedded_guidance)

    def _forward(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x.shape
        guidance = None
        # FLUX-dev; schnell has no guidance embedder (config: a diffusers ConfigMixin attribute)
        if cast(Any, self.transformer).config.guidance_embeds:
            value = float(cond.meta.get(EMBEDDED_GUIDANCE_KEY, self.embedded_guidance))
            guidance = torch.full((b,), value, device=x.device, dtype=torch.float32)
        embeds = cond["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(
            hidden_states=pack_latents(x),
            timestep=(self.time_scale * t).to(x.dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=image_ids(h // 2, w // 2, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


class FluxTeacher(TeacherBase):
    """A FLUX pipeline seen by sidflow: prompt encoder, VAE codec and teacher denoiser.

    Args:
        pipe: a ``FluxPipeline``.
        time_scale: 1 (the transformer scales ``t`` by 1000 itself).
        max_sequence_length: T5 tokens (512 as in the reference).
        embedded_guidance: default embedded guidance when ``cond.meta`` has none.
        name, device: for messages; compute device.
    """

    family = "flux"

    def __init__(
        self,
        pipe,
        *,
        time_scale: float = FAMILIES["flux"].time_scale,
        max_sequence_length: int = FAMILIES["flux"].max_sequence_length,
        embedded_guidance: float = 1.0,
        name: str = "flux",
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(
            pipe,
            FluxDenoiser(pipe.transformer, time_scale, embedded_guidance),
            name=name,
            device=device,
            vae_factor=pipe.vae_scale_factor,
            token_factor=2,
        )
        self.max_sequence_length = int(max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """``{"prompt_embeds" [B, L, D_T5], "pooled_prompt_embeds" [B, 768]}`` in fp32 (``""`` included)."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.text_device, max_sequence_length=self.max_sequence_length
        )
        return Cond({"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}).to(self.device)

    def _set_timesteps(self, scheduler, num_steps: int, latent_shape: tuple[int, int, int]) -> None:
        # As FluxPipeline: sigmas linspace(1, 1/N, N) and the resolution-dependent shift mu.
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        seq_len = (latent_shape[1] // 2) * (latent_shape[2] // 2)
        mu = calculate_shift(
            seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)


DENOISER = FluxDenoiser  # the wrapper of this family's transformer (sidflow plan builds it on meta)


def load(
    source: str | Path,
    *,
    name: str,
    time_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    transformer_device: str | None = None,
    max_sequence_length: int | None = None,
    origins: dict[str, str] | None = None,
    hub: dict | None = None,
) -> FluxTeacher:
    """Load with diffusers' ``FluxPipeline.from_pretrained`` (hub id or local folder); ``time_scale``
    / ``max_sequence_length`` None are read from the pipeline (:mod:`sidflow.teachers.defaults`)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    options = transformer_kwargs(FluxTransformer2DModel, source, dtype, transformer_device, hub)
    pipe = load_component(lambda: FluxPipeline.from_pretrained(str(source), dtype=dtype, **options), "pipeline", name)
    prepare_pipeline(pipe, device, text_encoder_dtype, transformer_device)
    return with_defaults(
        FluxTeacher,
        pipe,
        "flux",
        name=name,
        device=device,
        time_scale=time_scale,
        max_sequence_length=max_sequence_length,
        origins=origins,
    )
