"""SANA (RF) and SANA-Sprint teachers (spec 1.1, 1.2, 2.1, 10.3).

``SanaTransformer2DModel`` predicts the rectified-flow velocity on latents ``[B, 32, H/32, W/32]``
(DC-AE, ``latent = z * scaling``, no shift). The RF checkpoints take ``timestep = 1000 t``; the
SANA-Sprint *teacher* checkpoints use a dense time embedding fed ``t`` itself (``time_scale = 1``,
spec 1.2: no TrigFlow maths, the same RF equations). Which one a checkpoint is comes from its
``transformer.config.timestep_scale`` (1 or 0.001), as diffusers' ``SanaPipeline`` applies it.
The SiD reference never passes a guidance embedding to SANA, so a transformer with
``guidance_embeds=True`` is refused as a teacher.

Text: Gemma-2 through the pipeline's own ``encode_prompt``, with SANA's complex human instruction
(CHI) preamble prepended to every non-empty prompt -> ``prompt_embeds [B, 300, 2304]`` and
``prompt_attention_mask [B, 300]``. The empty prompt is the unconditional encoding: Gemma on ``""``
*without* the CHI (spec 2.1), also when it appears inside a batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from sidflow.core.denoiser import Cond
from sidflow.errors import TeacherLoadError
from sidflow.teachers.base import (
    TeacherBase,
    TransformerDenoiser,
    load_component,
    prepare_pipeline,
    transformer_kwargs,
)
from sidflow.teachers.defaults import with_defaults
from sidflow.teachers.families import FAMILIES, time_scale_from_config

__all__ = ["SanaDenoiser", "SanaTeacher", "load", "default_complex_human_instruction"]

NEEDED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")


def default_complex_human_instruction() -> list[str]:
    """The CHI preamble that diffusers' ``SanaPipeline.__call__`` uses by default."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaDenoiser(TransformerDenoiser):
    """Wraps ``SanaTransformer2DModel``: ``v = transformer(x_t, embeds, mask, time_scale * t)``."""

    fsdp_blocks = FAMILIES["sana"].fsdp_blocks
    lora_targets = FAMILIES["sana"].lora_targets

    def __init__(self, transformer: nn.Module, time_scale: float) -> None:
        if cast(Any, transformer).config.guidance_embeds:  # a diffusers ConfigMixin attribute
            raise TeacherLoadError(
                "this SANA transformer has a guidance embedder (guidance_embeds=True), "
                "which the SiD teacher path never feeds; use a Sprint *teacher* "
                "checkpoint without it"
            )
        super().__init__(transformer, time_scale)

    def _forward(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.transformer(
            x,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=self.time_scale * t,
            return_dict=False,
        )[0]


class SanaTeacher(TeacherBase):
    """A SANA pipeline seen by sidflow: prompt encoder (with CHI), DC-AE codec and teacher denoiser.

    Args:
        pipe: a ``SanaPipeline`` (or ``SanaSprintPipeline``).
        time_scale: 1000 for RF checkpoints, 1 for SANA-Sprint teachers.
        max_sequence_length: Gemma tokens kept per prompt (300).
        complex_human_instruction: the CHI lines; ``None`` = diffusers' default, ``[]`` = none.
        sprint: a SANA-Sprint teacher (family ``sana_sprint``).
        name, device: for messages; compute device.
    """

    family = "sana"

    def __init__(
        self,
        pipe,
        *,
        time_scale: float,
        max_sequence_length: int = FAMILIES["sana"].max_sequence_length,
        complex_human_instruction: list[str] | None = None,
        sprint: bool = False,
        name: str = "sana",
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(
            pipe,
            SanaDenoiser(pipe.transformer, time_scale),
            name=name,
            device=device,
            vae_factor=pipe.vae_scale_factor,
            token_factor=pipe.transformer.config.patch_size,
        )
        self.max_sequence_length = int(max_sequence_length)
        self.complex_human_instruction = (
            default_complex_human_instruction() if complex_human_instruction is None else complex_human_instruction
        )
        self.family = "sana_sprint" if sprint else "sana"

    def encoder_settings(self) -> dict:
        """The base settings plus the CHI preamble, which changes every non-empty prompt's embedding."""
        return {**super().encoder_settings(), "complex_human_instruction": self.complex_human_instruction}

    def scheduler(self):
        """SANA ships DPM-Solver in flow mode; the equivalent ``FlowMatchEulerDiscreteScheduler``
        keeps its flow shift (the Euler sampler and the export use it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(self.pipe.scheduler.config)
        if type(self.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        return FlowMatchEulerDiscreteScheduler.from_config({"shift": float(config.get("flow_shift") or 1.0)})

    def export_pipeline(
        self, generator: TransformerDenoiser, out: Path, *, stochastic_sampling: bool, components: dict | None = None
    ) -> Path:
        """As :meth:`TeacherBase.export_pipeline`, with the generator's ``timestep_scale`` set to the
        time scale it was trained with (``time_scale / 1000``): the stock ``SanaPipeline`` feeds
        ``1000 t * timestep_scale``, so a teacher run with ``teacher.time_scale`` set against its
        config exports a pipeline that feeds what the generator learned (the config entry only)."""
        transformer = cast(Any, generator.transformer)  # a diffusers ConfigMixin
        wanted = self.denoiser.time_scale / 1000.0
        if float(transformer.config.get("timestep_scale", 1.0)) != wanted:
            transformer.register_to_config(timestep_scale=wanted)
        return super().export_pipeline(generator, out, stochastic_sampling=stochastic_sampling, components=components)

    def _encode(self, prompts: list[str], chi: list[str] | None) -> tuple[Tensor, Tensor]:
        kwargs = {
            "device": self.text_device,
            "max_sequence_length": self.max_sequence_length,
            "complex_human_instruction": chi,
        }
        if "do_classifier_free_guidance" in inspect.signature(self.pipe.encode_prompt).parameters:
            kwargs["do_classifier_free_guidance"] = False  # SanaPipeline; SanaSprintPipeline has no CFG
        out = self.pipe.encode_prompt(prompts, **kwargs)
        return out[0].float(), out[1]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """``{"prompt_embeds" [B, 300, D], "prompt_attention_mask" [B, 300]}``; ``""`` -> uncond (no CHI)."""
        prompts = list(prompts)
        full = [i for i, p in enumerate(prompts) if p != ""]
        empty = [i for i, p in enumerate(prompts) if p == ""]
        parts: dict[int, tuple[Tensor, Tensor]] = {}
        if full:
            embeds, mask = self._encode([prompts[i] for i in full], self.complex_human_instruction or None)
            parts.update({i: (embeds[j], mask[j]) for j, i in enumerate(full)})
        if empty:
            embeds, mask = self._encode([""], None)
            parts.update({i: (embeds[0], mask[0]) for i in empty})
        rows = [parts[i] for i in range(len(prompts))]
        return Cond(
            {
                "prompt_embeds": torch.stack([r[0] for r in rows]),
                "prompt_attention_mask": torch.stack([r[1] for r in rows]),
            }
        ).to(self.device)


DENOISER = SanaDenoiser  # the wrapper of this family's transformer (sidflow plan builds it on meta)


def load(
    source: str | Path,
    *,
    name: str,
    time_scale: float | None = None,
    sprint: bool = False,
    dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    transformer_device: str | None = None,
    max_sequence_length: int | None = None,
    origins: dict[str, str] | None = None,
    hub: dict | None = None,
    complex_human_instruction: list[str] | None = None,
) -> SanaTeacher:
    """Load with diffusers' ``from_pretrained`` of the folder's own SANA pipeline class.

    ``time_scale`` None: ``1000 * transformer.config.timestep_scale``, as ``SanaPipeline`` feeds it
    (1000 for the RF checkpoints, 1 for the Sprint teachers, whose config says 0.001); a transformer
    whose config scales time is a Sprint teacher whatever its name (:mod:`sidflow.teachers.defaults`).
    """
    from diffusers import DiffusionPipeline, SanaTransformer2DModel

    options = transformer_kwargs(SanaTransformer2DModel, source, dtype, transformer_device, hub)
    pipe = load_component(
        lambda: DiffusionPipeline.from_pretrained(str(source), dtype=dtype, **options), "pipeline", name
    )
    config = pipe.transformer.config
    sprint = sprint or time_scale_from_config("sana", dict(config)) != FAMILIES["sana"].time_scale
    if sprint and config.guidance_embeds:
        raise TeacherLoadError(
            f"{name} is a SANA-Sprint checkpoint with a guidance embedder; SiD needs the "
            "Sprint *teacher* checkpoint (guidance_embeds=False)"
        )
    prepare_pipeline(pipe, device, text_encoder_dtype, transformer_device)
    family = "sana_sprint" if sprint else "sana"
    return with_defaults(
        SanaTeacher,
        pipe,
        family,
        name=name,
        device=device,
        time_scale=time_scale,
        max_sequence_length=max_sequence_length,
        origins=origins,
        complex_human_instruction=complex_human_instruction,
        sprint=sprint,
    )
