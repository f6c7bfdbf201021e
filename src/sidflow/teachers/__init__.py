"""Real teachers through diffusers: SD3/SD3.5, FLUX.1-dev, SANA and SANA-Sprint (spec 1.1, 2, 10.3).

``load_teacher(path_or_id)`` reads a pipeline folder's ``model_index.json`` (or a known hub id's
shipped config), picks the family adapter and loads the components with diffusers' own
``from_pretrained``. Every failure is a one-line :class:`~sidflow.errors.TeacherLoadError`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from sidflow.config import TeacherConfig
from sidflow.errors import TeacherLoadError
from sidflow.teachers.base import SIDFLOW_TEACHER_FILE, TeacherBase, check_components, read_model_index
from sidflow.teachers.families import FAMILIES, PIPELINE_FAMILIES, get_family, time_scale_from_config
from sidflow.teachers.hub import download_first, hub_index, hub_options, token_from_env

__all__ = ["FAMILIES", "PIPELINE_FAMILIES", "TeacherBase", "load_teacher", "detect_family", "teacher_load_options"]

_TEXT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_load_options(config: TeacherConfig) -> dict[str, Any]:
    """:func:`load_teacher` keywords of a run's teacher settings beyond path, scale and length: the
    text encoders' precision (``auto``: None, bf16 on CUDA and fp32 on CPUs) and the hub
    ``revision`` / ``variant`` / token, read from the environment variable ``teacher.token_env``
    at load time so that it never enters a config file."""
    return {
        "text_encoder_dtype": _TEXT_DTYPES.get(config.text_encoder_dtype),
        "revision": config.revision,
        "variant": config.variant,
        "token": token_from_env(config.token_env),
    }


def detect_family(index: dict, name: str, sidecar: dict | None = None, transformer_config: dict | None = None) -> str:
    """Family from a sidflow sidecar, else the pipeline class; a ``SanaPipeline`` whose transformer
    config states a ``timestep_scale`` other than 1 is a SANA-Sprint teacher (fed ``t``), whatever
    its folder is called."""
    if sidecar and sidecar.get("family"):
        return str(sidecar["family"])
    cls = str(index.get("_class_name", ""))
    if cls not in PIPELINE_FAMILIES:
        raise TeacherLoadError(
            f"{name}: pipeline class '{cls}' is not a supported teacher family; "
            f"supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
        )
    family = PIPELINE_FAMILIES[cls]
    scale = time_scale_from_config(family, transformer_config)
    if family == "sana" and scale is not None and scale != FAMILIES["sana"].time_scale:
        family = "sana_sprint"
    return family


def _transformer_config(folder: Path) -> dict | None:
    """``transformer/config.json`` of a local folder (None when absent or unreadable: the loader says why)."""
    path = folder / "transformer" / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _resolve(path_or_id: str | Path) -> tuple[Path | None, str]:
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherLoadError(f"{path} is a file, not a diffusers pipeline folder; pass the folder")
        return path, str(path)
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return None, text  # a hub id
    raise TeacherLoadError(
        f"{text} does not exist; pass a local pipeline folder or a hub id like "
        "stabilityai/stable-diffusion-3-medium-diffusers"
    )


def load_teacher(
    path_or_id: str | Path,
    *,
    family: str | None = None,
    time_scale: float | None = None,
    text_encoder_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int | None = None,
    transformer_device: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    token: str | None = None,
) -> TeacherBase:
    """Load a teacher (``SD3Teacher``, ``FluxTeacher`` or ``SanaTeacher``).

    Args:
        path_or_id: local diffusers pipeline folder or hub id.
        family: force a family (``sd3``, ``sd35``, ``flux``, ``sana``, ``sana_sprint``).
        time_scale: transformer time input ``time_scale * t`` (spec 1.1); None: read from the
            pipeline (:mod:`sidflow.teachers.defaults`), else the family's.
        text_encoder_dtype: text-encoder precision (default bf16 on CUDA, fp32 on CPU).
        device: compute device.
        dtype: transformer and VAE weight dtype.
        max_sequence_length: text tokens; None: the text tokenizer's ``model_max_length`` capped by
            the family's maximum (SD3 T5: 77, FLUX T5: 512, SANA Gemma: 300).
        transformer_device: None puts the transformer on ``device`` with the rest; ``"cpu"`` keeps
            its weights in host memory, ``"meta"`` reads none (built from its config): under
            shard-first FSDP2 rank 0 loads it on the CPU and the other ranks on meta.
        revision, variant, token: passed to ``from_pretrained`` (:mod:`sidflow.teachers.hub`); a
            hub id under ``torch.distributed`` is downloaded by rank 0 first.

    Returns:
        The family's teacher object, with ``.denoiser``, ``encode_prompts``, ``uncond``,
        ``encode_images``, ``decode_latents``, ``latent_shape``, ``sigmas`` and ``make_denoisers``.
    """
    folder, name = _resolve(path_or_id)
    hub = hub_options(revision, variant, token)
    sidecar, transformer_config = None, None
    if folder is not None:
        index = read_model_index(folder)
        sidecar_path = folder / SIDFLOW_TEACHER_FILE
        sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else None
        transformer_config = _transformer_config(folder)
    else:
        index = hub_index(name, hub)
        sidecar = index.get("_sidflow")
    if family is None:
        family = detect_family(index, name, sidecar, transformer_config)
    get_family(family)  # one-line error for an unknown forced family
    fam = FAMILIES[family]
    # a sidecar (e.g. the bundled digits teacher's) states what the teacher was trained with
    origins: dict[str, str] = {}
    side = sidecar or {}
    if time_scale is None and side.get("time_scale") is not None:
        time_scale, origins["time_scale"] = float(side["time_scale"]), SIDFLOW_TEACHER_FILE
    if max_sequence_length is None and side.get("max_sequence_length") is not None:
        max_sequence_length = int(side["max_sequence_length"])
        origins["max_sequence_length"] = SIDFLOW_TEACHER_FILE
    if folder is None:
        hub = download_first(name, hub)
    kwargs: dict[str, Any] = {
        "name": name,
        "time_scale": time_scale,
        "max_sequence_length": max_sequence_length,
        "origins": origins,
        "dtype": dtype,
        "text_encoder_dtype": text_encoder_dtype,
        "device": device,
        "transformer_device": transformer_device,
        "hub": hub,
    }
    module = importlib.import_module(f"sidflow.teachers.{fam.module}")
    if family.startswith("sana"):
        kwargs["sprint"] = family == "sana_sprint"
    if folder is not None:
        check_components(folder, index, module.NEEDED)
    teacher = module.load(folder if folder is not None else name, **kwargs)
    if fam.module != "sana":  # SANA decides from the loaded transformer (a hub id's timestep_scale)
        teacher.family = family  # e.g. "sd35" for a shipped SD3.5 config (same adapter as "sd3")
    if teacher.denoiser.model_dtype != dtype:  # diffusers without accelerate ignores dtype=
        raise TeacherLoadError(
            f"{name}: the transformer loaded as {teacher.denoiser.model_dtype}, not {dtype}; "
            "install accelerate (pip install accelerate), which diffusers needs to honour dtype"
        )
    return teacher
