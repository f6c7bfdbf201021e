"""The generator as a stock diffusers pipeline (spec 15), with the few-step settings beside it.

The teacher adapter writes the pipeline folder (its own class and components, the generator as
transformer); this module adds ``sidflow_generator.json`` and a model card (``README.md``) with the
exact stock call: the step times to pass as ``sigmas`` (the same
:func:`~sidflow.core.generator.generator_step_times` the training used, shift included), the
guidance (1: no CFG; FLUX: the generator's embedded guidance), the text length the generator was
distilled with (the stock pipelines default to others: SD3 256 T5 tokens, FLUX 512) and the
resolution. Called so, the stock pipeline reproduces ``sidflow sample`` for the same initial noise
(tests/teachers/test_export.py, per family, at 1, 2 and 4 steps).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sidflow.config import SiDConfig
from sidflow.core.generator import generator_step_times
from sidflow.teachers.lora import diffusers_lora_state, fused_transformer

__all__ = ["export_generator", "export_lora", "stock_call", "SETTINGS_FILE", "CARD_FILE", "LORA_DIR", "LORA_FILE"]

SETTINGS_FILE, CARD_FILE = "sidflow_generator.json", "README.md"
LORA_DIR, LORA_FILE = "generator_lora", "pytorch_lora_weights.safetensors"


def export_generator(teacher: Any, generator: Any, out: Path, config: SiDConfig) -> Path:
    """Save ``generator`` as a pipeline of the teacher's class in ``out``; returns ``out``.

    The scheduler is ``FlowMatchEulerDiscreteScheduler(shift=1)``, stochastic for the ``fresh`` noise
    type (plain Euler for ``ddim``). Call the pipeline with ``sigmas=sigmas[:k]`` from the settings
    file and ``guidance_scale=1.0``.
    """
    gc = config.generator
    if getattr(generator, "lora", None) is not None:  # LoRA mode: the adapter merged into a copy of the base
        generator = SimpleNamespace(transformer=fused_transformer(generator.transformer, generator.adapter))
    teacher.export_pipeline(generator, out, stochastic_sampling=gc.noise_type == "fresh")
    call = stock_call(teacher, config)
    settings = _write_settings(out, config, _usage("pipe(prompt, sigmas=sigmas[:k]", call), teacher, call)
    (out / CARD_FILE).write_text(_model_card(type(teacher.pipe).__name__, settings))
    return out


def stock_call(teacher: Any, config: SiDConfig) -> dict[str, Any]:
    """The keyword arguments (besides ``prompt`` and ``sigmas``) that make the teacher's stock
    pipeline run the generator as sidflow does: no CFG, the distilled text length and resolution;
    FLUX's ``guidance_scale`` is its *embedded* guidance, the generator's (``guidance.embedded_generator``;
    none: the adapter's default 1)."""
    guidance = 1.0
    if getattr(teacher.denoiser, "embedded_guidance", None) is not None:
        embedded = config.guidance.embedded_generator
        guidance = float(embedded if embedded is not None else teacher.denoiser.embedded_guidance)
    call: dict[str, Any] = {"guidance_scale": guidance}
    if getattr(teacher, "max_sequence_length", None) is not None:
        call["max_sequence_length"] = int(teacher.max_sequence_length)
    call["height"] = call["width"] = config.data.resolution
    return call


def _usage(head: str, call: dict[str, Any]) -> str:
    return head + "".join(f", {k}={v!r}" for k, v in call.items()) + ")"


def export_lora(teacher: Any, generator: Any, out: Path, config: SiDConfig) -> Path:
    """LoRA mode: the generator's adapter alone in ``out`` (``pytorch_lora_weights.safetensors`` with
    its peft config as metadata, written by the teacher pipeline class's ``save_lora_weights``), and
    the few-step settings beside it. The stock pipeline of the teacher loads it with
    ``pipe.load_lora_weights(out)``; its scheduler must be the few-step one (``scheduler`` in the
    settings file: shift 1, stochastic for fresh noise) and each call passes ``sigmas``."""
    from dataclasses import asdict

    transformer = generator.transformer
    adapter = generator.adapter
    metadata = transformer.peft_config[adapter].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    out.mkdir(parents=True, exist_ok=True)
    type(teacher.pipe).save_lora_weights(
        str(out),
        transformer_lora_layers=diffusers_lora_state(generator.state_dict(), adapter),
        weight_name=LORA_FILE,
        transformer_lora_adapter_metadata=metadata,
    )
    call = stock_call(teacher, config)
    usage = _usage(
        "pipe.scheduler = FlowMatchEulerDiscreteScheduler(**scheduler); pipe.load_lora_weights(folder); "
        "pipe(prompt, sigmas=sigmas[:k]",
        call,
    )
    _write_settings(out, config, usage, teacher, call, extra={"lora": asdict(config.lora)})
    return out


def _write_settings(
    out: Path, config: SiDConfig, usage: str, teacher: Any, call: dict[str, Any], extra: dict | None = None
) -> dict[str, Any]:
    gc = config.generator
    sigmas = [round(t, 6) for t in generator_step_times(gc.num_steps, gc.t_init, gc.shift)]
    settings = {
        "sigmas": sigmas,
        "guidance_scale": call["guidance_scale"],
        "call": call,  # the stock call's other keywords, exactly
        "noise_type": gc.noise_type,
        "scheduler": {"shift": 1.0, "use_dynamic_shifting": False, "stochastic_sampling": gc.noise_type == "fresh"},
        "usage": usage + "; fixed noise has no stock equivalent",
        "resolution": config.data.resolution,  # what it was distilled at (sidflow eval reads it)
        "teacher": config.teacher.path,
        # what the teacher ran with, read from its pipeline unless set (sidflow eval loads it so)
        "time_scale": float(teacher.denoiser.time_scale),
        "max_sequence_length": call.get("max_sequence_length"),
        **(extra or {}),
    }
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return settings


_NOISE = {
    "fresh": "the scheduler re-noises after each step (`stochastic_sampling=True`) with noise from the "
    "global RNG: seed `torch.manual_seed` as well as `generator=` for repeatable images",
    "ddim": "plain Euler steps (no re-noising): deterministic given the initial latents",
    "fixed": "sidflow's `fixed` noise has no stock equivalent; this export re-noises like `fresh`",
}


def _model_card(pipeline: str, settings: dict[str, Any]) -> str:
    """README.md of an exported pipeline: how to call the stock class so that it samples as sidflow."""
    steps = len(settings["sigmas"])
    call = ", ".join(f"{k}={v!r}" for k, v in settings["call"].items())
    scheduler = ", ".join(f"{k}={v!r}" for k, v in settings["scheduler"].items())
    embedded = "; for FLUX it is the *embedded* guidance" if pipeline == "FluxPipeline" else ""
    seed = (
        ["torch.manual_seed(0)  # fresh noise is drawn from the global RNG"] if settings["noise_type"] != "ddim" else []
    )
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags: [sidflow, score-identity-distillation, few-step]",
        "---",
        "",
        f"# A {steps}-step generator distilled by Score identity Distillation (sidflow)",
        "",
        f"Teacher: `{settings['teacher']}`. Load it with the stock `{pipeline}` and call it with the step",
        "times as `sigmas` (the first k of them for a k-step image) and exactly these arguments:",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("PATH_TO_THIS_FOLDER")',
        f"sigmas = {settings['sigmas']}",
        f"k = {steps}  # 1..{steps} steps",
        *seed,
        f'image = pipe("a prompt", sigmas=sigmas[:k], {call}).images[0]',
        "```",
        "",
        f"* `guidance_scale={settings['guidance_scale']!r}`: the generator needs no classifier-free guidance "
        f"(the stock pipelines default to 7.0 / 3.5 / 4.5){embedded}.",
        f"* `max_sequence_length={settings['max_sequence_length']!r}`: the text length it was distilled with; "
        "the stock defaults differ (SD3: 256 T5 tokens, FLUX: 512).",
        f"* Noise type `{settings['noise_type']}`: {_NOISE[settings['noise_type']]}.",
        f"* The scheduler in this folder is `FlowMatchEulerDiscreteScheduler({scheduler})`; the step times",
        "  are passed explicitly, so no shift applies.",
        "",
        "`sidflow_generator.json` holds the same settings for programs (`sidflow eval` reads it).",
        "",
    ]
    return "\n".join(lines)
