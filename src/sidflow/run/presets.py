"""Named presets: the registry, and the real-teacher presets.

Real-teacher presets follow the spec's defaults (section 10: kappa 4.5 everywhere, Adam (0, 0.999),
global batch 256, micro-batch 8, 4-step generator, 1 M images) at each model's HF release resolution
(section 6.5), with the memory setup ``sidflow plan`` found to fit 80 GB GPUs (README, "Memory"):
``train.precision=auto`` (``amp_bf16`` on CUDA: fp32 master weights and Adam, bf16 autocast),
``train.sharding=fsdp2`` (shard first over torchrun's ranks; one process runs unsharded), gradient
checkpointing of all three networks, and prompt embeddings cached on disk (``data.cache_dir``) so the
text encoders leave the GPU once every prompt is encoded.

Learning rate (spec 6.2): the reference gives two AMP values, 1e-6 in its README ("AMP (autocast
bf16) + FSDP", stated for every model) and 5e-6 in its only stored launch script, which is
SANA-600M's. The presets take each where it was actually stated: 5e-6 for the SANA teachers (the
scripted run), 1e-6 for SD3/SD3.5/FLUX (the README's AMP + FSDP setting, which is exactly the
presets' setup; 5x smaller steps on 2-12 B models is also the safer side of the two). Under
``train.precision=pure_bf16`` the reference's README uses 1e-5 (with Adam eps 1e-4, our default).
Plugins register their own presets (the bundled ``digits`` default, the ``gmm-*`` analytic runs)
through :func:`register_preset`.
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
    "sana-sprint-1.6b-teacher-4step": ("Efficient-Large-Model/Sana_Sprint_1.6B_1024px_teacher_diffusers", 1024),
}


PROMPT_CACHE = "prompt_cache"  # data.cache_dir of the real-teacher presets (relative to the working directory)


def _real(hub_id: str, resolution: int) -> SiDConfig:
    spec = shipped_config(hub_id)
    assert spec is not None, hub_id  # every preset's hub id has a shipped config
    family = FAMILIES[spec["family"]]
    lr = 5e-6 if family.name.startswith("sana") else 1e-6  # see the module docstring
    return SiDConfig(
        teacher=TeacherConfig(kind="pipeline", path=hub_id, dtype="float32", gradient_checkpointing="on"),
        guidance=GuidanceConfig(
            kappa1=4.5, kappa2=4.5, kappa4=4.5, embedded_teacher=4.5 if family.embedded_guidance else None
        ),
        optim=OptimConfig(lr=lr, glr=lr),
        train=TrainConfig(
            batch=256,
            batch_gpu=8,
            total_kimg=1000.0,
            log_every=10,
            ckpt_every=100,
            precision="auto",
            sharding="fsdp2",
        ),
        data=DataConfig(prompts="prompts.txt", resolution=resolution, cache_dir=PROMPT_CACHE),
    )


for _name, (_hub, _res) in REAL_TEACHERS.items():
    register_preset(_name, _real(_hub, _res))
