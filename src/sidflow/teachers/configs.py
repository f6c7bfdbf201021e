"""Teacher architectures without weights: shipped public configs and meta-device models.

The public component configs of the supported teachers ship with sidflow
(``sidflow/teachers/shipped/*.json``: family, pipeline class, hub ids, time scale and every
component's ``(library, class, config)``), so ``sidflow info`` works offline for a hub id. A local
pipeline folder is described from its own ``model_index.json`` and ``*/config.json`` files. Models
are instantiated on the ``meta`` device: shapes and parameter counts, no memory, no weights.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from sidflow.errors import TeacherLoadError

__all__ = [
    "TeacherSpec",
    "shipped_specs",
    "shipped_config",
    "spec_from_folder",
    "resolve_spec",
    "meta_model",
    "count_params",
]

TeacherSpec = dict  # {"name", "family", "pipeline", "hub_ids", "settings", "components"} (+ "time_scale")
MODEL_KEYS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def shipped_specs() -> dict[str, TeacherSpec]:
    """Every shipped teacher spec, by file stem (e.g. ``"sd3-medium"``)."""
    folder = resources.files("sidflow.teachers") / "shipped"
    return {
        Path(entry.name).stem: json.loads(entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".json")
    }


def shipped_config(hub_id_or_stem: str) -> TeacherSpec | None:
    """The shipped spec of a hub id (case-insensitive) or file stem, or None."""
    key = hub_id_or_stem.strip().lower()
    for stem, spec in shipped_specs().items():
        if key == stem or key in (h.lower() for h in spec["hub_ids"]):
            return spec
    return None


def spec_from_folder(folder: Path, family: str, time_scale: float) -> TeacherSpec:
    """A spec read from a local pipeline folder's ``model_index.json`` and component configs."""
    from sidflow.teachers.base import read_model_index

    index = read_model_index(folder)
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        config_path = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if name in MODEL_KEYS or name == "scheduler":
            if not config_path.is_file():
                raise TeacherLoadError(f"{folder} lacks {name}/{config_path.name}; re-save the pipeline")
            components[name] = [entry[0], entry[1], json.loads(config_path.read_text())]
    return {
        "name": str(folder),
        "family": family,
        "pipeline": index.get("_class_name", "?"),
        "hub_ids": [],
        "time_scale": time_scale,
        "settings": {},
        "components": components,
    }


def resolve_spec(path_or_id: str, family: str | None = None, time_scale: float | None = None) -> dict:
    """Shipped spec of a hub id / stem, or a spec read from a local pipeline folder."""
    from sidflow.teachers import detect_family  # lazy: the package imports this module
    from sidflow.teachers.base import SIDFLOW_TEACHER_FILE, read_model_index
    from sidflow.teachers.families import FAMILIES, time_scale_from_config

    folder = Path(path_or_id).expanduser()
    if folder.is_dir():
        side = folder / SIDFLOW_TEACHER_FILE
        sidecar = json.loads(side.read_text()) if side.is_file() else None
        config_path = folder / "transformer" / "config.json"
        transformer_config = json.loads(config_path.read_text()) if config_path.is_file() else None
        fam = family or detect_family(read_model_index(folder), str(folder), sidecar, transformer_config)
        if time_scale is None:  # as load_teacher: the sidecar, the transformer's config, the family
            from_config = time_scale_from_config(fam, transformer_config)
            time_scale = (sidecar or {}).get("time_scale") or from_config or FAMILIES[fam].time_scale
        return spec_from_folder(folder, fam, float(time_scale))
    spec = shipped_config(path_or_id)
    if spec is None:
        known = ", ".join(h for s in shipped_specs().values() for h in s["hub_ids"])
        raise TeacherLoadError(
            f"no local folder and no shipped config for '{path_or_id}'; pass a pipeline folder or one of: {known}"
        )
    return spec


def meta_model(library: str, class_name: str, config: dict) -> nn.Module:
    """Instantiate a diffusers or transformers model on the meta device (no weights, no memory)."""
    import diffusers
    import transformers

    module = diffusers if library == "diffusers" else transformers
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TeacherLoadError(f"{library} has no class {class_name}; upgrade {library} or fix the config")
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(clean)
        return cls(cls.config_class(**clean))


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
