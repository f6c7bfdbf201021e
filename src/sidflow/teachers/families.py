"""Per-family facts, found once: diffusers pipeline classes, time scale, text length, FSDP blocks.

Every other module that needs a family default reads it here (adapters, ``load_teacher``, ``sidflow
info``, presets, FSDP sharding). Spec 1.1 (time scales), 2 (text encoders), 16 (FSDP units).

* ``time_scale``: the transformer is fed ``time_scale * t``; SD3/SD3.5 and SANA take ``1000 t``, FLUX
  takes ``t`` (it scales by 1000 inside), the SANA-Sprint teacher's dense time embedding takes ``t``.
  A loaded SANA pipeline's own ``transformer.config.timestep_scale`` overrides it
  (:func:`time_scale_from_config`), as diffusers' ``SanaPipeline`` applies it.
* ``max_sequence_length``: the most text tokens per prompt (SD3: the T5 part, the reference's 77, on
  top of 77 CLIP tokens; FLUX: T5 512; SANA: Gemma 300); a pipeline whose ``text_tokenizer`` says
  fewer (``model_max_length``) gets that (:mod:`sidflow.teachers.defaults`).
* ``text_tokenizer``: the pipeline component whose ``model_max_length`` bounds that length.
* ``fsdp_blocks``: the transformer's block lists, each block one FSDP2 unit (spec 16).
* ``lora_targets``: the layers LoRA mode puts adapters on (``lora.targets``' default).
* ``embedded_guidance``: the transformer takes FLUX-style embedded guidance as an input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidflow.errors import TeacherLoadError

__all__ = ["Family", "FAMILIES", "PIPELINE_FAMILIES", "get_family", "time_scale_from_config"]


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # adapter module under sidflow.teachers
    pipeline: str  # the diffusers pipeline class that loads it
    time_scale: float
    max_sequence_length: int
    fsdp_blocks: tuple[str, ...]
    lora_targets: tuple[str, ...]
    embedded_guidance: bool = False
    text_tokenizer: str = "tokenizer"


_BLOCKS = ("transformer_blocks",)
# LoRA targets (``lora.targets`` default): attention and MLP projections inside the blocks, as
# module-name suffixes (sidflow.teachers.lora.target_modules); the joint blocks' text stream included
_JOINT = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
# FLUX's single-stream blocks add their fused MLP in and out; SANA's MLP is 1x1 convolutions
# (GLUMBConv; its depthwise convolution is left out)
_FLUX = (*_JOINT, "proj_mlp", "proj_out")
_SANA = ("to_q", "to_k", "to_v", "to_out.0", "ff.conv_inverted", "ff.conv_point")
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd3", "sd3", "StableDiffusion3Pipeline", 1000.0, 77, _BLOCKS, _JOINT, text_tokenizer="tokenizer_3"),
        Family("sd35", "sd3", "StableDiffusion3Pipeline", 1000.0, 77, _BLOCKS, _JOINT, text_tokenizer="tokenizer_3"),
        Family(
            "flux",
            "flux",
            "FluxPipeline",
            1.0,
            512,
            ("transformer_blocks", "single_transformer_blocks"),
            _FLUX,
            embedded_guidance=True,
            text_tokenizer="tokenizer_2",
        ),
        Family("sana", "sana", "SanaPipeline", 1000.0, 300, _BLOCKS, _SANA),
        Family("sana_sprint", "sana", "SanaSprintPipeline", 1.0, 300, _BLOCKS, _SANA),
    )
}
# diffusers pipeline class -> family (SD3.5 checkpoints use the SD3 pipeline class)
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "SanaPipeline": "sana",
    "SanaSprintPipeline": "sana_sprint",
}


def get_family(name: str) -> Family:
    """The :class:`Family` called ``name``, or a one-line TeacherLoadError listing the valid ones."""
    if name not in FAMILIES:
        raise TeacherLoadError(f"unsupported teacher family '{name}'; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def time_scale_from_config(family: str, transformer_config: Mapping[str, Any] | None) -> float | None:
    """The time scale a transformer's own config states, or None where it states none.

    diffusers' ``SanaPipeline`` feeds ``timestep * transformer.config.timestep_scale`` with the
    scheduler's ``timestep = 1000 t``: 1 for the RF checkpoints, 0.001 for the SANA-Sprint teachers
    (their dense time embedding expects ``t``). sidflow feeds ``time_scale * t``, so it is
    ``1000 * timestep_scale``. SD3 and FLUX configs carry no such entry (their scale is the family's).
    """
    if not family.startswith("sana") or not transformer_config:
        return None
    return 1000.0 * float(transformer_config.get("timestep_scale", 1.0))
