"""SD3-Medium, SD3.5-Medium and SD3.5-Large teachers (spec 1.1, 2.2, 10.3).

The MMDiT ``SD3Transformer2DModel`` predicts the rectified-flow velocity ``v = eps - x0`` and takes
``timestep = 1000 t`` (``time_scale = 1000``). Text conditioning comes from the pipeline's own
``encode_prompt``: CLIP-L and CLIP-G penultimate states, zero-padded to the T5 width and stacked with
the T5 states -> ``prompt_embeds [B, 77 + L_T5, 4096]``; pooled CLIP-L ⊕ CLIP-G ->
``pooled_prompt_embeds [B, 2048]``. The T5 length is a setting (default: ``tokenizer_3``'s
``model_max_length`` capped at 77, as in the reference; the diffusers pipeline defaults to 256, so an
export's model card states it). ``text_encoder_3`` may be absent (diffusers then uses zeros).
Latents are ``[B, 16, H/8, W/8]`` with ``latent = (z - shift) * scaling``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sidflow.core.denoiser import Cond
from sidflow.teachers.base import (
    TeacherBase,
    TransformerDenoiser,
    load_component,
    prepare_pipeline,
    read_model_index,
    transformer_kwargs,
)
from sidflow.teachers.defaults import with_defaults
from sidflow.teachers.families import FAMILIES

__all__ = ["SD3Denoiser", "SD3Teacher", "load", "zero_t5"]

NEEDED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class SD3Denoiser(TransformerDenoiser):
    """Wraps ``SD3Transformer2DModel``: ``v = transformer(x_t, time_scale * t, embeds, pooled)``."""

    fsdp_blocks = FAMILIES["sd3"].fsdp_blocks
    lora_targets = FAMILIES["sd3"].lora_targets

    def _forward(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.transformer(
            hidden_states=x,
            timestep=self.time_scale * t,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]


class SD3Teacher(TeacherBase):
    """An SD3/SD3.5 pipeline seen by sidflow: prompt encoder, VAE codec and teacher denoiser.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (components on ``device``).
        time_scale: the transformer is fed ``time_scale * t`` (1000 for every SD3 checkpoint).
        max_sequence_length: T5 tokens per prompt (77 as in the reference).
        name: hub id or folder, for messages.
        device: compute device.
    """

    family = "sd3"

    def __init__(
        self,
        pipe,
        *,
        time_scale: float = FAMILIES["sd3"].time_scale,
        max_sequence_length: int = FAMILIES["sd3"].max_sequence_length,
        name: str = "sd3",
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(
            pipe,
            SD3Denoiser(pipe.transformer, time_scale),
            name=name,
            device=device,
            vae_factor=pipe.vae_scale_factor,
            token_factor=pipe.transformer.config.patch_size,
        )
        self.max_sequence_length = int(max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """``{"prompt_embeds" [B, 77 + L, D], "pooled_prompt_embeds" [B, P]}`` in fp32.

        The empty prompt goes through the same encoders (the unconditional embedding is the
        encoding of ``""``, not zeros; spec 2.2).
        """
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.text_device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Cond({"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}).to(self.device)

    def export_pipeline(
        self, generator: TransformerDenoiser, out: Path, *, stochastic_sampling: bool, components: dict | None = None
    ) -> Path:
        """As :meth:`TeacherBase.export_pipeline`; a pipeline without T5 (the bundled digits teacher)
        gets a stand-in T5 that outputs zeros, because ``StableDiffusion3Pipeline.from_pretrained``
        refuses a folder whose ``text_encoder_3`` / ``tokenizer_3`` are null unless the caller passes
        them as None, and without T5 diffusers feeds exactly those zeros."""
        if self.pipe.text_encoder_3 is None:
            components = {**(components or {}), **zero_t5(self.pipe, self.max_sequence_length)}
        return super().export_pipeline(generator, out, stochastic_sampling=stochastic_sampling, components=components)

    def _set_timesteps(self, scheduler, num_steps: int, latent_shape: tuple[int, int, int]) -> None:
        # As StableDiffusion3Pipeline: mu only when the scheduler uses dynamic shifting (SD3.5 does not).
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.token_factor
            seq_len = (latent_shape[1] // patch) * (latent_shape[2] // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, **kwargs)


def zero_t5(pipe, max_sequence_length: int) -> dict:
    """``{"text_encoder_3", "tokenizer_3"}`` standing in for an absent T5: a layer-free T5 encoder
    with all-zero weights (its output, ``final_layer_norm`` of zeros, is exactly 0) of the width the
    transformer reads, in the CLIP encoders' dtype, and a T5 tokenizer of three pieces. Without T5,
    ``StableDiffusion3Pipeline`` feeds zeros ``[B, L, joint_attention_dim]``: the same tensor."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)], extra_ids=0)
    tokenizer.model_max_length = int(max_sequence_length)
    width = int(pipe.transformer.config.joint_attention_dim)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=1, d_ff=1, num_layers=0, num_heads=1)
    encoder = T5EncoderModel(config).eval().requires_grad_(False)
    for param in encoder.parameters():
        torch.nn.init.zeros_(param)
    encoder.to(next(pipe.text_encoder.parameters()).dtype)
    return {"text_encoder_3": encoder, "tokenizer_3": tokenizer}


DENOISER = SD3Denoiser  # the wrapper of this family's transformer (sidflow plan builds it on meta)


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
) -> SD3Teacher:
    """Load with diffusers' ``StableDiffusion3Pipeline.from_pretrained`` (hub id or local folder);
    ``time_scale`` / ``max_sequence_length`` None are read from the pipeline (:mod:`sidflow.teachers.defaults`)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    # Components saved as [null, null] (e.g. a pipeline without T5) must be passed as None explicitly,
    # otherwise from_pretrained reports them as missing.
    absent = {}
    if Path(source).is_dir():
        index = read_model_index(Path(source))
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}
    options = transformer_kwargs(SD3Transformer2DModel, source, dtype, transformer_device, hub)
    pipe = load_component(
        lambda: StableDiffusion3Pipeline.from_pretrained(str(source), dtype=dtype, **absent, **options),
        "pipeline",
        name,
    )
    prepare_pipeline(pipe, device, text_encoder_dtype, transformer_device)
    return with_defaults(
        SD3Teacher,
        pipe,
        "sd3",
        name=name,
        device=device,
        time_scale=time_scale,
        max_sequence_length=max_sequence_length,
        origins=origins,
    )
