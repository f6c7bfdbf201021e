"""SD3 / SD3.5 adapter against the stock diffusers pipeline of the same tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from sidflow.errors import TeacherLoadError
from sidflow.teachers import load_teacher
from sidflow.testing import load_pipeline as load_pipe

PROMPTS = ["a red cat", "two dogs on a hill"]


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def pair(request, tiny):
    path = tiny(request.param)
    return load_teacher(path), load_pipe(path)


def test_x0_and_scheduler_step_match_plain_diffusers(pair):
    teacher, pipe = pair
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=77
    )
    x_t = torch.randn(2, *teacher.latent_shape(32), generator=torch.Generator().manual_seed(1))
    pipe.scheduler.set_timesteps(4)
    timestep = pipe.scheduler.timesteps[1].expand(2)  # the pipeline's own 0..1000 timestep
    v_ref = pipe.transformer(
        hidden_states=x_t, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False
    )[0]
    t = pipe.scheduler.sigmas[1].expand(2)
    v = teacher.denoiser.velocity(x_t, t, teacher.encode_prompts(PROMPTS))
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x_t - t.view(-1, 1, 1, 1) * v, x_t - pipe.scheduler.sigmas[1] * v_ref, atol=1e-6, rtol=0)
    # one Euler step in sidflow's convention == FlowMatchEulerDiscreteScheduler.step
    step_ref = pipe.scheduler.step(v_ref, pipe.scheduler.timesteps[1], x_t, return_dict=False)[0]
    sigmas = teacher.sigmas(4, teacher.latent_shape(32))
    torch.testing.assert_close(x_t + (sigmas[2] - sigmas[1]) * v, step_ref, atol=1e-6, rtol=0)


def test_features_are_pooled_norm_out_tokens(pair):
    teacher, pipe = pair
    x_t = torch.randn(2, *teacher.latent_shape(32))
    t = torch.tensor([0.3, 0.8])
    cond = teacher.encode_prompts(PROMPTS)
    v, feats = teacher.denoiser.velocity_and_features(x_t, t, cond)
    torch.testing.assert_close(v, teacher.denoiser.velocity(x_t, t, cond))
    inner = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    assert feats.shape == (2, inner) and feats.dtype == torch.float32
    # independent: norm_out applied to the image stream, then proj_out, reproduces v before unpatchify
    seen = {}
    proj_out = teacher.denoiser.transformer.proj_out
    handle = proj_out.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    teacher.denoiser.velocity(x_t, t, cond)
    handle.remove()
    torch.testing.assert_close(feats, seen["in"].mean(dim=1))


def test_vae_scaling_and_shift(pair):
    teacher, pipe = pair
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = teacher.encode_images(images, generator=torch.Generator().manual_seed(5))
    z = pipe.vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(5))
    cfg = pipe.vae.config
    torch.testing.assert_close(latents, (z - cfg.shift_factor) * cfg.scaling_factor)
    decoded = teacher.decode_latents(latents)
    torch.testing.assert_close(decoded, pipe.vae.decode(z).sample)
    assert decoded.shape == images.shape


def test_latent_shape_and_resolution_error(pair):
    teacher, _ = pair
    assert teacher.latent_shape(32) == (4, 16, 16)
    assert teacher.latent_shape((32, 64)) == (4, 16, 32)
    with pytest.raises(TeacherLoadError, match="not divisible by 4") as err:
        teacher.latent_shape(30)
    assert "\n" not in str(err.value)


def test_empty_prompt_is_uncond_and_t5_length_is_a_setting(tiny):
    teacher = load_teacher(tiny("sd3"), max_sequence_length=20)
    cond = teacher.encode_prompts(["", "a cat"])
    assert cond["prompt_embeds"].shape[1] == 77 + 20
    torch.testing.assert_close(cond.index([0])["prompt_embeds"], teacher.uncond(1)["prompt_embeds"])
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])


def test_three_networks(pair):
    teacher, _ = pair
    psi, phi, theta = teacher.make_denoisers()
    assert psi is teacher.denoiser and phi is not psi and theta is not phi
    assert not any(p.requires_grad for p in psi.parameters())
    assert all(p.requires_grad for p in phi.parameters()) and all(p.requires_grad for p in theta.parameters())
    first = next(phi.parameters())
    assert first.data_ptr() != next(psi.parameters()).data_ptr()
    torch.testing.assert_close(first, next(psi.parameters()))
