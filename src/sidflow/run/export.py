"""The generator as a stock diffusers pipeline (spec 15), with the few-step settings beside it.

The teacher adapter writes the pipeline folder (its own class and components, the generator as
transformer); this module adds ``sidflow_generator.json``: the step times to pass as ``sigmas`` (the
same :func:`~sidflow.core.generator.generator_step_times` the training used, shift included) and
``guidance_scale=1``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sidflow.config import SiDConfig
from sidflow.core.generator import generator_step_times
from sidflow.teachers.lora import diffusers_lora_state, fused_transformer

__all__ = ["export_generator", "export_lora", "SETTINGS_FILE", "LORA_DIR", "LORA_FILE"]

SETTINGS_FILE = "sidflow_generator.json"
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
    _write_settings(out, config, "pipe(prompt, sigmas=sigmas[:k], guidance_scale=1.0)")
    return out


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
    _write_settings(
        out,
        config,
        "pipe.scheduler = FlowMatchEulerDiscreteScheduler(**scheduler); pipe.load_lora_weights(folder); "
        "pipe(prompt, sigmas=sigmas[:k], guidance_scale=1.0)",
        extra={"lora": asdict(config.lora)},
    )
    return out


def _write_settings(out: Path, config: SiDConfig, usage: str, extra: dict | None = None) -> None:
    gc = config.generator
    sigmas = [round(t, 6) for t in generator_step_times(gc.num_steps, gc.t_init, gc.shift)]
    settings = {
        "sigmas": sigmas,
        "guidance_scale": 1.0,
        "noise_type": gc.noise_type,
        "scheduler": {"shift": 1.0, "use_dynamic_shifting": False, "stochastic_sampling": gc.noise_type == "fresh"},
        "usage": usage + "; fixed noise has no stock equivalent",
        "resolution": config.data.resolution,  # what it was distilled at (sidflow eval reads it)
        "teacher": config.teacher.path,
        **(extra or {}),
    }
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
