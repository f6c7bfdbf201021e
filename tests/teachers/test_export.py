"""Every family's export, loaded with its stock diffusers class and called exactly as its model card
says, reproduces sidflow's samples for the same initial noise (spec 15, issue 15).

Tolerance: 2e-4 absolute and relative on the latents (fp32 tiny pipelines; the two paths differ
only in the order of float operations: CFG-free batch layout, latent packing, scheduler arithmetic).
``fresh`` noise: the stock scheduler draws each step's noise (from the global RNG for SD3/FLUX,
from ``generator=`` for SANA); the test seeds both and hands sidflow the same draws.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from sidflow.config import DataConfig, GeneratorConfig, SiDConfig
from sidflow.core.generator import generate, generator_step_times
from sidflow.core.guidance import with_embedded_guidance
from sidflow.run.export import CARD_FILE, SETTINGS_FILE, export_generator
from sidflow.teachers import load_teacher

PROMPTS = ["a red cat", "a blue house"]
FAMILIES = ("sd3", "sd35", "flux", "sana", "sana_sprint")


def _perturbed_generator(teacher):
    """The generator: a trainable copy of the teacher, moved off it (the export must save *it*)."""
    _, _, generator = teacher.make_denoisers()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in generator.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return generator.requires_grad_(False)


def _stock(folder):
    """The folder loaded the way a user would: the stock class named in its model_index.json."""
    name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_export(teacher, generator, folder, noise_type, family):
    config = SiDConfig(generator=GeneratorConfig(num_steps=4, noise_type=noise_type), data=DataConfig(resolution=32))
    export_generator(teacher, generator, folder, config)
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    call = settings["call"]
    card = (folder / CARD_FILE).read_text()
    assert ", ".join(f"{k}={v!r}" for k, v in call.items()) in card and str(settings["sigmas"]) in card
    assert call["max_sequence_length"] == teacher.max_sequence_length and call["height"] == 32
    pipe = _stock(folder)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    flux = family == "flux"
    cond = with_embedded_guidance(teacher.encode_prompts(PROMPTS), call["guidance_scale"] if flux else None)
    shape = teacher.latent_shape(32)
    z = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4))
    step_times = generator_step_times(4, 1.0, None)

    def pack(x):
        return pipe._pack_latents(x, 2, shape[0], shape[1], shape[2]) if flux else x

    def unpack(x):
        return pipe._unpack_latents(x, 32, 32, pipe.vae_scale_factor) if flux else x

    for steps in (1, 2, 4):
        seed = 100 + steps
        draws = torch.Generator().manual_seed(seed)  # what the stock scheduler will draw, step by step
        fresh = torch.stack([unpack(torch.randn(pack(z).shape, generator=draws)) for _ in range(4)])
        with torch.no_grad():
            ours = generate(
                generator,
                cond,
                shape,
                steps=steps,
                step_times=step_times,
                noise_type=noise_type,
                z=z,
                fresh_noise=fresh,
            )
        torch.manual_seed(seed)  # SD3 and FLUX draw the step noise from the global RNG
        stock = pipe(
            PROMPTS,
            sigmas=settings["sigmas"][:steps],
            latents=pack(z),
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),  # SANA passes it to the scheduler
            **call,
        ).images
        torch.testing.assert_close(unpack(stock), ours, rtol=2e-4, atol=2e-4, msg=f"{family} {steps} steps")


@pytest.mark.parametrize("noise_type", ["ddim", "fresh"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stock_pipeline_called_as_the_card_says_reproduces_sidflow(family, noise_type, tiny, tmp_path):
    teacher = load_teacher(tiny(family))
    _check_export(teacher, _perturbed_generator(teacher), tmp_path / "export", noise_type, family)


def test_sd3_without_t5_exports_a_folder_the_plain_stock_call_loads(tiny, tmp_path):
    """A teacher without T5 (the bundled digits teacher's layout): the export loads with plain
    ``StableDiffusion3Pipeline.from_pretrained(folder)`` and still samples as sidflow."""
    from sidflow.testing import load_pipeline

    pipe = load_pipeline(tiny("sd3"))
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    pipe.save_pretrained(tmp_path / "no-t5")
    teacher = load_teacher(tmp_path / "no-t5")
    assert teacher.pipe.text_encoder_3 is None and teacher.max_sequence_length == 77
    _check_export(teacher, _perturbed_generator(teacher), tmp_path / "export", "ddim", "sd3")
    exported = _stock(tmp_path / "export")
    ids = exported.tokenizer_3(["a red cat"], return_tensors="pt").input_ids
    assert not exported.text_encoder_3(ids)[0].any()  # the stand-in feeds the zeros diffusers would


def test_sana_export_states_the_time_scale_the_generator_learned(tiny, tmp_path):
    """A SANA RF folder run with ``teacher.time_scale=1`` against its config: the exported
    transformer's ``timestep_scale`` makes the stock pipeline feed ``t`` too."""
    teacher = load_teacher(tiny("sana"), time_scale=1.0)
    _check_export(teacher, _perturbed_generator(teacher), tmp_path / "export", "ddim", "sana")
    config = json.loads((tmp_path / "export" / "transformer" / "config.json").read_text())
    assert config["timestep_scale"] == 0.001
