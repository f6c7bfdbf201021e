"""sidflow's teacher Euler sampler == ``pipe(..., output_type="latent")`` (SD3, SD3.5, SANA; FLUX in
test_flux.py), 1 and 4 steps, with and without CFG, the pipeline's own shift, fp32 to 1e-5."""

from __future__ import annotations

import pytest
import torch

from sidflow.core.sampling import euler_sample
from sidflow.teachers import load_teacher
from sidflow.testing import load_pipeline as load_pipe

PROMPTS = ["a red cat", "two dogs on a hill"]
PIPE_KWARGS = {
    "sd3": {"max_sequence_length": 77},
    "sd35": {"max_sequence_length": 77},
    "sana": {"use_resolution_binning": False},
}


@pytest.fixture(scope="module", params=sorted(PIPE_KWARGS))
def family_pair(request, tiny):
    path = tiny(request.param)
    return request.param, load_teacher(path), load_pipe(path)


@pytest.mark.parametrize("num_steps,w", [(1, 1.0), (1, 4.5), (4, 4.5)])
def test_euler_sampler_reproduces_pipeline(family_pair, num_steps, w):
    family, teacher, pipe = family_pair
    ref = pipe(
        PROMPTS,
        height=32,
        width=32,
        num_inference_steps=num_steps,
        guidance_scale=w,
        output_type="latent",
        generator=torch.Generator().manual_seed(3),
        **PIPE_KWARGS[family],
    ).images
    shape = teacher.latent_shape(32)
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(3))
    out = euler_sample(
        teacher.denoiser, noise, teacher.sigmas(num_steps, shape), teacher.encode_prompts(PROMPTS), teacher.uncond(2), w
    )
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_teacher_sample_matches_pipeline(tiny):
    path = tiny("sd3")
    teacher, pipe = load_teacher(path), load_pipe(path)
    ref = pipe(
        PROMPTS,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(9),
        max_sequence_length=77,
    ).images
    noise = torch.randn((len(PROMPTS), *teacher.latent_shape(32)), generator=torch.Generator().manual_seed(9))
    out = teacher.sample(PROMPTS, noise, num_steps=2, guidance_scale=3.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
