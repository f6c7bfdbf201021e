"""Per-family defaults read from the loaded pipeline: the one place a teacher's settings are chosen.

A pipeline folder nobody has seen (a small FLUX trained on 32-token T5 prompts, a renamed
SANA-Sprint teacher) carries its own facts; feeding it the family's constants instead produces noise
silently (issue 15). So every adapter's ``load`` resolves, in this order of precedence:

* **text length** (``max_sequence_length``): the setting (``teacher.max_sequence_length``, or a
  ``sidflow_teacher.json`` beside the folder) > the family's text tokenizer's ``model_max_length``
  (SD3: ``tokenizer_3``, FLUX: ``tokenizer_2``, SANA: ``tokenizer``), capped by the family's maximum
  (SD3 T5 77 as in the reference, FLUX 512, SANA 300; a tokenizer may only shorten it) > the
  family's maximum (no tokenizer, e.g. SD3 without T5);
* **time scale**: the setting > the transformer's own ``config.timestep_scale`` (SANA, as diffusers'
  ``SanaPipeline`` applies it; :func:`~sidflow.teachers.families.time_scale_from_config`) > the
  family's constant.

What was chosen, and from where, is printed once at load in one line, with the facts the adapters
read from the pipeline as they are (VAE factor, latent scaling and shift, scheduler shift).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sidflow.teachers.families import get_family, time_scale_from_config

__all__ = ["PipelineDefaults", "resolve_defaults", "tokenizer_length", "with_defaults"]

# transformers' "no limit" sentinel for model_max_length is int(1e30); anything this large is unset
_UNSET_LENGTH = 10**9


@dataclass(frozen=True)
class PipelineDefaults:
    """The settings a teacher runs with, and where each came from (for the load line)."""

    max_sequence_length: int
    time_scale: float
    sources: dict[str, str]


def tokenizer_length(pipe: Any, component: str) -> int | None:
    """``model_max_length`` of the pipeline's ``component`` tokenizer, or None (absent or unset)."""
    tokenizer = getattr(pipe, component, None)
    length = getattr(tokenizer, "model_max_length", None)
    if not isinstance(length, int) or length <= 0 or length >= _UNSET_LENGTH:
        return None
    return length


def resolve_defaults(
    pipe: Any,
    family: str,
    *,
    name: str,
    time_scale: float | None = None,
    max_sequence_length: int | None = None,
    origins: dict[str, str] | None = None,
) -> PipelineDefaults:
    """The text length and time scale of a loaded pipeline (precedence in the module docstring).

    Args:
        pipe: the loaded diffusers pipeline.
        family: its family name (``sd3``, ``sd35``, ``flux``, ``sana``, ``sana_sprint``).
        name: folder or hub id, for the load line.
        time_scale, max_sequence_length: explicit values (``teacher.*`` settings); None = read.
        origins: what each explicit value is called in the load line (by argument name; default
            ``"setting"``; e.g. ``"sidflow_teacher.json"``).

    Returns:
        The resolved :class:`PipelineDefaults` (also printed once, on rank 0).
    """
    fam = get_family(family)
    origins = origins or {}
    sources: dict[str, str] = {}
    if max_sequence_length is not None:
        length = int(max_sequence_length)
        sources["text length"] = origins.get("max_sequence_length", "setting")
    else:
        read = tokenizer_length(pipe, fam.text_tokenizer)
        if read is None:
            length, sources["text length"] = fam.max_sequence_length, f"{family} default, no {fam.text_tokenizer} limit"
        else:
            length = min(read, fam.max_sequence_length)
            cap = f", capped at {fam.max_sequence_length}" if read > fam.max_sequence_length else ""
            sources["text length"] = f"{fam.text_tokenizer}.model_max_length {read}{cap}"
    if time_scale is not None:
        scale, sources["time scale"] = float(time_scale), origins.get("time_scale", "setting")
    else:
        config = getattr(getattr(pipe, "transformer", None), "config", None)
        from_config = time_scale_from_config(family, dict(config) if config is not None else None)
        if from_config is not None:
            scale = from_config
            sources["time scale"] = f"transformer timestep_scale {from_config / 1000:g}"
        else:
            scale, sources["time scale"] = fam.time_scale, f"{family} default"
    defaults = PipelineDefaults(max_sequence_length=length, time_scale=scale, sources=sources)
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per torchrun rank
        print(describe_load(pipe, family, name, defaults))
    return defaults


def describe_load(pipe: Any, family: str, name: str, defaults: PipelineDefaults) -> str:
    """The one load line: the chosen settings with their sources, then what is read as it is."""
    vae = getattr(pipe, "vae", None)
    vae_config = getattr(vae, "config", None)
    scheduler_config = getattr(getattr(pipe, "scheduler", None), "config", {}) or {}
    facts = []
    if getattr(pipe, "vae_scale_factor", None):
        facts.append(f"VAE factor {pipe.vae_scale_factor}")
    if vae_config is not None:
        facts.append(
            f"latent scaling {float(vae_config.scaling_factor):g} "
            f"shift {float(getattr(vae_config, 'shift_factor', None) or 0.0):g}"
        )
    shift = scheduler_config.get("shift", scheduler_config.get("flow_shift"))
    if shift is not None:
        facts.append(f"scheduler shift {float(shift):g}")
    return (
        f"teacher {name} ({family}): text length {defaults.max_sequence_length} "
        f"({defaults.sources['text length']}), time scale {defaults.time_scale:g} "
        f"({defaults.sources['time scale']}); " + ", ".join(facts)
    )


def with_defaults(
    cls: type,
    pipe: Any,
    family: str,
    *,
    name: str,
    device: Any,
    time_scale: float | None,
    max_sequence_length: int | None,
    origins: dict[str, str] | None,
    **kwargs: Any,
) -> Any:
    """``cls(pipe, ...)``, a family's teacher, with the text length and time scale
    :func:`resolve_defaults` chooses (every adapter's ``load`` ends here)."""
    chosen = resolve_defaults(
        pipe, family, name=name, time_scale=time_scale, max_sequence_length=max_sequence_length, origins=origins
    )
    return cls(
        pipe,
        time_scale=chosen.time_scale,
        max_sequence_length=chosen.max_sequence_length,
        name=name,
        device=device,
        **kwargs,
    )
