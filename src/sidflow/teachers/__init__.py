"""Real teachers through diffusers: SD3/SD3.5, FLUX.1-dev, SANA and SANA-Sprint (spec 1.1, 2, 10.3).

``load_teacher(path_or_id)`` reads a pipeline folder's ``model_index.json`` (or a known hub id's
shipped config), picks the family adapter and loads the components with diffusers' own
``from_pretrained``. Every failure is a one-line :class:`~sidflow.errors.TeacherLoadError`.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from sidflow.errors import TeacherLoadError
from sidflow.teachers.base import SIDFLOW_TEACHER_FILE, TeacherBase, check_components, read_model_index
from sidflow.teachers.families import FAMILIES, PIPELINE_FAMILIES, get_family

__all__ = ["FAMILIES", "PIPELINE_FAMILIES", "TeacherBase", "load_teacher", "detect_family"]

log = logging.getLogger(__name__)


def detect_family(index: dict, name: str, sidecar: dict | None = None) -> str:
    """Family from a sidflow sidecar, else the pipeline class (``"sprint"`` in a SANA name -> Sprint)."""
    if sidecar and sidecar.get("family"):
        return str(sidecar["family"])
    cls = str(index.get("_class_name", ""))
    if cls not in PIPELINE_FAMILIES:
        raise TeacherLoadError(
            f"{name}: pipeline class '{cls}' is not a supported teacher family; "
            f"supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
        )
    family = PIPELINE_FAMILIES[cls]
    if family == "sana" and "sprint" in name.lower():
        log.warning(
            "%s: 'sprint' in the name, treating it as a SANA-Sprint teacher (pass family= to be explicit)", name
        )
        family = "sana_sprint"
    return family


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


def _hub_index(repo_id: str) -> dict:
    """model_index.json of a hub id: shipped config offline, else the hub."""
    from sidflow.teachers.configs import shipped_config

    shipped = shipped_config(repo_id)
    if shipped is not None:  # the family and time scale are facts of the shipped config
        return {"_class_name": shipped["pipeline"], "_sidflow": {"family": shipped["family"]}}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text())
    except Exception as err:  # offline, unknown repo, gated: all one line
        raise TeacherLoadError(
            f"cannot read model_index.json of hub id {repo_id} ({type(err).__name__}); "
            "check the id, log in for gated repos, or pass a local folder"
        ) from None


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
) -> TeacherBase:
    """Load a teacher (``SD3Teacher``, ``FluxTeacher`` or ``SanaTeacher``).

    Args:
        path_or_id: local diffusers pipeline folder or hub id.
        family: force a family (``sd3``, ``sd35``, ``flux``, ``sana``, ``sana_sprint``).
        time_scale: transformer time input ``time_scale * t`` (spec 1.1); default per family.
        text_encoder_dtype: text-encoder precision (default bf16 on CUDA, fp32 on CPU).
        device: compute device.
        dtype: transformer and VAE weight dtype.
        max_sequence_length: text tokens (SD3 T5: 77, FLUX T5: 512, SANA Gemma: 300 by default).
        transformer_device: None puts the transformer on ``device`` with the rest; ``"cpu"`` keeps
            its weights in host memory, ``"meta"`` reads none (built from its config): under
            shard-first FSDP2 rank 0 loads it on the CPU and the other ranks on meta.

    Returns:
        The family's teacher object, with ``.denoiser``, ``encode_prompts``, ``uncond``,
        ``encode_images``, ``decode_latents``, ``latent_shape``, ``sigmas`` and ``make_denoisers``.
    """
    folder, name = _resolve(path_or_id)
    sidecar = None
    if folder is not None:
        index = read_model_index(folder)
        side = folder / SIDFLOW_TEACHER_FILE
        sidecar = json.loads(side.read_text()) if side.is_file() else None
    else:
        index = _hub_index(name)
        sidecar = index.get("_sidflow")
    if family is None:
        family = detect_family(index, name, sidecar)
    fam = get_family(family)
    if time_scale is None and sidecar and sidecar.get("time_scale") is not None:
        time_scale = float(sidecar["time_scale"])
    if max_sequence_length is None and sidecar and sidecar.get("max_sequence_length") is not None:
        max_sequence_length = int(sidecar["max_sequence_length"])  # the text length the teacher was trained with
    scale = float(time_scale) if time_scale is not None else fam.time_scale
    kwargs: dict[str, Any] = {
        "name": name,
        "time_scale": scale,
        "dtype": dtype,
        "text_encoder_dtype": text_encoder_dtype,
        "device": device,
        "transformer_device": transformer_device,
    }
    kwargs["max_sequence_length"] = int(
        max_sequence_length if max_sequence_length is not None else fam.max_sequence_length
    )
    module = importlib.import_module(f"sidflow.teachers.{fam.module}")
    if family.startswith("sana"):
        kwargs["sprint"] = family == "sana_sprint"
    if folder is not None:
        check_components(folder, index, module.NEEDED)
    teacher = module.load(folder if folder is not None else name, **kwargs)
    teacher.family = family  # e.g. "sd35" for a shipped SD3.5 config (same adapter as "sd3")
    if teacher.denoiser.model_dtype != dtype:  # diffusers without accelerate ignores dtype=
        raise TeacherLoadError(
            f"{name}: the transformer loaded as {teacher.denoiser.model_dtype}, not {dtype}; "
            "install accelerate (pip install accelerate), which diffusers needs to honour dtype"
        )
    return teacher
