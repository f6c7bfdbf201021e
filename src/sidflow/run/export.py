"""The generator as a stock diffusers pipeline (spec 15), with the few-step settings beside it.

The teacher adapter writes the pipeline folder (its own class and components, the generator as
transformer); this module adds ``sidflow_generator.json``: the step times to pass as ``sigmas`` (the
same :func:`~sidflow.core.generator.generator_step_times` the training used, shift included) and
``guidance_scale=1``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sidflow.config import SiDConfig
from sidflow.core.generator import generator_step_times

__all__ = ["export_generator", "SETTINGS_FILE"]

SETTINGS_FILE = "sidflow_generator.json"


def export_generator(teacher: Any, generator: Any, out: Path, config: SiDConfig) -> Path:
    """Save ``generator`` as a pipeline of the teacher's class in ``out``; returns ``out``.

    The scheduler is ``FlowMatchEulerDiscreteScheduler(shift=1)``, stochastic for the ``fresh`` noise
    type (plain Euler for ``ddim``). Call the pipeline with ``sigmas=sigmas[:k]`` from the settings
    file and ``guidance_scale=1.0``.
    """
    gc = config.generator
    teacher.export_pipeline(generator, out, stochastic_sampling=gc.noise_type == "fresh")
    sigmas = [round(t, 6) for t in generator_step_times(gc.num_steps, gc.t_init, gc.shift)]
    (out / SETTINGS_FILE).write_text(
        json.dumps(
            {
                "sigmas": sigmas,
                "guidance_scale": 1.0,
                "noise_type": gc.noise_type,
                "usage": "pipe(prompt, sigmas=sigmas[:k], guidance_scale=1.0); fixed noise has no stock equivalent",
            },
            indent=1,
        )
        + "\n"
    )
    return out
