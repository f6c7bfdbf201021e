"""What a teacher costs, from its configs alone: parameters, latent shapes, cache and memory.

Everything is computed from a :data:`~sidflow.teachers.configs.TeacherSpec` with models built on the
``meta`` device (no weights are read or allocated).

Training-memory estimate for full SiD distillation (spec 2, 6.3), ``P`` = transformer parameters:

* fp32 AMP: frozen teacher ``4P`` + fake score and generator each ``4P`` weights + ``4P`` grads +
  ``8P`` Adam moments -> ``36 P`` bytes;
* pure bf16: teacher ``2P`` + each trainable ``2P + 2P + 4P`` (Adam moments in bf16) -> ``18 P``;
* activations, rough: ``5 x 34 S C L`` bytes per sample (16-bit activations, the ~34 S C bytes per
  block of Korthikanti et al. 2022, without the attention-score term, which flash attention avoids),
  for ``S`` image + text tokens, inner width ``C``, ``L`` blocks and 5 forwards kept for backward in
  the generator phase (generator, teacher and fake on ``[uncond; cond]``); no gradient checkpointing;
* frozen text encoders (bf16) and VAE (fp32 / bf16) on top, unless the prompt cache lets the text
  encoders leave the GPU.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from sidflow.core.denoiser import Cond
from sidflow.errors import TeacherLoadError
from sidflow.teachers.base import check_resolution
from sidflow.teachers.configs import MODEL_KEYS, TeacherSpec, count_params, meta_model
from sidflow.teachers.families import FAMILIES

__all__ = [
    "describe",
    "latent_shape",
    "example_cond",
    "RESOLUTIONS",
    "ACT_BYTES_PER_TOKEN_WIDTH_BLOCK",
    "FORWARDS_WITH_GRAD",
]

RESOLUTIONS = (256, 512, 1024)
ACT_BYTES_PER_TOKEN_WIDTH_BLOCK = 34
FORWARDS_WITH_GRAD = 5


def _vae_factor(config: dict) -> int:
    channels = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    return 2 ** (len(cast(list[int], channels)) - 1)


def _transformer_geometry(family: str, config: dict) -> tuple[int, int, int]:
    """(token factor, inner width C, number of blocks L)."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    if family == "flux":
        return 2, inner, int(config["num_layers"]) + int(config["num_single_layers"])
    return int(config.get("patch_size", 1)), inner, int(config["num_layers"])


def _text_shape(
    family: str, spec: TeacherSpec, tf: dict, max_sequence_length: int | None = None
) -> tuple[int, int, int, int]:
    """(text tokens fed to the transformer, width, pooled width, mask bytes per token)."""
    tokens = max_sequence_length or int(
        spec.get("settings", {}).get("max_sequence_length", FAMILIES[family].max_sequence_length)
    )
    if family in ("sd3", "sd35"):
        return 77 + tokens, int(tf["joint_attention_dim"]), int(tf["pooled_projection_dim"]), 0
    if family == "flux":
        return tokens, int(tf["joint_attention_dim"]), int(tf["pooled_projection_dim"]), 0
    return tokens, int(tf["caption_channels"]), 0, 8


def _latents(family: str, vae: dict, vae_factor: int, token_factor: int, resolution: int):
    try:
        check_resolution(resolution, vae_factor * token_factor, "")
    except TeacherLoadError:
        return None
    side = resolution // vae_factor
    return (int(vae["latent_channels"]), side, side), (side // token_factor) ** 2


def latent_shape(spec: TeacherSpec, resolution: int) -> tuple[int, int, int]:
    """``(C, H/f, W/f)`` of a spec's unpacked latents (one-line TeacherLoadError if not divisible)."""
    comps = spec["components"]
    vae, vae_factor = comps["vae"][2], _vae_factor(comps["vae"][2])
    token_factor = _transformer_geometry(spec["family"], comps["transformer"][2])[0]
    check_resolution(resolution, vae_factor * token_factor, f"VAE factor {vae_factor} x patch {token_factor}")
    side = resolution // vae_factor
    return int(vae["latent_channels"]), side, side


def example_cond(spec: TeacherSpec, batch: int, max_sequence_length: int | None = None) -> Cond:
    """Zero conditioning shaped as the family's prompt encoder returns it (``sidflow plan``):
    SD3 ``prompt_embeds [B, 77 + T, D]`` and ``pooled_prompt_embeds``; FLUX ``[B, T, D]`` and
    pooled; SANA ``[B, T, D]`` with its ``prompt_attention_mask``."""
    family, tf = spec["family"], spec["components"]["transformer"][2]
    tokens, width, pooled, mask_bytes = _text_shape(family, spec, tf, max_sequence_length)
    tensors = {"prompt_embeds": torch.zeros(batch, tokens, width)}
    if pooled:
        tensors["pooled_prompt_embeds"] = torch.zeros(batch, pooled)
    if mask_bytes:
        tensors["prompt_attention_mask"] = torch.ones(batch, tokens, dtype=torch.long)
    return Cond(tensors)


def describe(spec: TeacherSpec, resolutions: tuple[int, ...] = RESOLUTIONS) -> dict:
    """Parameter counts, latent shapes, per-prompt cache bytes and memory estimates of a spec."""
    family, comps = spec["family"], spec["components"]
    params = {name: count_params(meta_model(*comps[name])) for name in MODEL_KEYS if name in comps}
    tf, vae = comps["transformer"][2], comps["vae"][2]
    vae_factor = _vae_factor(vae)
    token_factor, inner, blocks = _transformer_geometry(family, tf)
    text_tokens, width, pooled, mask_bytes = _text_shape(family, spec, tf)
    cache_bytes = 4 * (text_tokens * width + pooled) + mask_bytes * text_tokens  # cached in fp32
    big_p = params["transformer"]
    text_params = sum(v for k, v in params.items() if k.startswith("text_encoder"))
    per_res: dict[int, dict[str, Any] | None] = {}
    for res in resolutions:
        lat = _latents(family, vae, vae_factor, token_factor, res)
        if lat is None:
            per_res[res] = None
            continue
        shape, image_tokens = lat
        tokens = image_tokens + text_tokens
        act = FORWARDS_WITH_GRAD * ACT_BYTES_PER_TOKEN_WIDTH_BLOCK * tokens * inner * blocks
        per_res[res] = {"latent_shape": shape, "image_tokens": image_tokens, "activations_per_sample": act}
    memory = {
        "fp32_amp": {"networks": 36 * big_p, "aux": 2 * text_params + 4 * params["vae"]},
        "pure_bf16": {"networks": 18 * big_p, "aux": 2 * text_params + 2 * params["vae"]},
    }
    return {
        "name": spec["name"],
        "family": family,
        "pipeline": spec["pipeline"],
        "time_scale": spec.get("time_scale", FAMILIES[family].time_scale),
        "params": params,
        "vae_factor": vae_factor,
        "token_factor": token_factor,
        "inner_width": inner,
        "blocks": blocks,
        "text_tokens": text_tokens,
        "cache_bytes_per_prompt": cache_bytes,
        "resolutions": per_res,
        "memory": memory,
    }
