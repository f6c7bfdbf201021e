"""Named presets: the registry, and the real-teacher presets.

Real-teacher presets follow the spec's defaults (section 10: kappa 4.5 everywhere, lr = glr = 5e-6,
Adam (0, 0.999), global batch 256, micro-batch 8, 4-step generator, 1 M images) at each model's HF
release resolution (section 6.5); they need a GPU node. Plugins register their own (the bundled
``digits`` default, the ``gmm-*`` analytic runs) through :func:`register_preset`.
"""

from __future__ import annotations

import dataclasses

from sidflow.config import DataConfig, GuidanceConfig, OptimConfig, SiDConfig, TeacherConfig, TrainConfig
from sidflow.errors import ConfigError
from sidflow.run.registry import load_plugins
from sidflow.teachers.configs import shipped_config
from sidflow.teachers.families import FAMILIES

__all__ = ["PRESETS", "REAL_TEACHERS", "register_preset", "get_preset", "preset_names"]

PRESETS: dict[str, SiDConfig] = {}


def register_preset(name: str, config: SiDConfig, *, replace: bool = False) -> None:
    """Register a named preset (plugins register their own)."""
    if name in PRESETS and not replace:
        raise ConfigError(f"preset {name!r} already registered")
    PRESETS[name] = dataclasses.replace(config, name=name)


def get_preset(name: str) -> SiDConfig:
    """The preset called ``name`` (plugins loaded first), or a one-line ConfigError listing them."""
    load_plugins()
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_names() -> list[str]:
    """Every registered preset name, sorted (plugins loaded first)."""
    load_plugins()
    return sorted(PRESETS)


# preset name -> (hub id, resolution); the family (time scale, embedded guidance) comes from the
# shipped config of the hub id (sidflow.teachers.families)
REAL_TEACHERS: dict[str, tuple[str, int]] = {
    "sd3-medium-4step": ("stabilityai/stable-diffusion-3-medium-diffusers", 1024),
    "sd35-medium-4step": ("stabilityai/stable-diffusion-3.5-medium", 1024),
    "sd35-large-4step": ("stabilityai/stable-diffusion-3.5-large", 1024),
    "flux-dev-4step": ("black-forest-labs/FLUX.1-dev", 512),
    "sana-600m-4step": ("Efficient-Large-Model/Sana_600M_512px_diffusers", 512),
    "sana-1600m-4step": ("Efficient-Large-Model/Sana_1600M_512px_diffusers", 512),
    "sana-sprint-0.6b-teacher-4step": ("Efficient-Large-Model/Sana_Sprint_0.6B_1024px_teacher_diffusers", 1024),
}


def _real(hub_id: str, resolution: int) -> SiDConfig:
    spec = shipped_config(hub_id)
    assert spec is not None, hub_id  # every preset's hub id has a shipped config
    family = FAMILIES[spec["family"]]
    return SiDConfig(
        teacher=TeacherConfig(kind="pipeline", path=hub_id, dtype="float32", gradient_checkpointing="on"),
        guidance=GuidanceConfig(
            kappa1=4.5, kappa2=4.5, kappa4=4.5, embedded_teacher=4.5 if family.embedded_guidance else None
        ),
        optim=OptimConfig(lr=5e-6, glr=5e-6),
        train=TrainConfig(batch=256, batch_gpu=8, total_kimg=1000.0, log_every=10, ckpt_every=100),
        data=DataConfig(prompts="prompts.txt", resolution=resolution),
    )


for _name, (_hub, _res) in REAL_TEACHERS.items():
    register_preset(_name, _real(_hub, _res))
