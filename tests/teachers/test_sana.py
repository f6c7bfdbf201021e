"""SANA (RF) and SANA-Sprint-teacher adapters against the stock diffusers SanaPipeline."""

from __future__ import annotations

import pytest
import torch

from sidflow.teachers import load_teacher
from sidflow.teachers.sana import default_complex_human_instruction as chi
from sidflow.testing import load_pipeline as load_pipe

PROMPTS = ["a red cat", "two dogs on a hill"]


@pytest.fixture(scope="module")
def pair(tiny):
    path = tiny("sana")
    return load_teacher(path), load_pipe(path)


def test_x0_matches_transformer_with_pipeline_timestep(pair):
    teacher, pipe = pair
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, complex_human_instruction=chi())
    x_t = torch.randn(2, *teacher.latent_shape(32), generator=torch.Generator().manual_seed(1))
    pipe.scheduler.set_timesteps(4)
    timestep = pipe.scheduler.timesteps[2].expand(2) * pipe.transformer.config.timestep_scale
    v_ref = pipe.transformer(
        x_t, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timestep, return_dict=False
    )[0]
    t = pipe.scheduler.sigmas[2].expand(2)
    v = teacher.denoiser.velocity(x_t, t, teacher.encode_prompts(PROMPTS))
    torch.testing.assert_close(x_t - t.view(-1, 1, 1, 1) * v, x_t - pipe.scheduler.sigmas[2] * v_ref, atol=1e-6, rtol=0)


def test_empty_prompt_is_uncond_without_chi(pair):
    teacher, pipe = pair
    cond = teacher.encode_prompts(["a cat", ""])
    embeds, mask = pipe._get_gemma_prompt_embeds([""], "cpu", torch.float32, complex_human_instruction=None)
    torch.testing.assert_close(cond["prompt_embeds"][1:], embeds[:, :300])
    torch.testing.assert_close(cond["prompt_attention_mask"][1:], mask[:, :300])
    with_chi, _, _, _ = pipe.encode_prompt(
        ["a cat"], do_classifier_free_guidance=False, complex_human_instruction=chi()
    )
    torch.testing.assert_close(cond["prompt_embeds"][:1], with_chi)
    assert cond["prompt_attention_mask"].dtype == torch.long


def test_vae_scaling_no_shift(pair):
    teacher, pipe = pair
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = teacher.encode_images(images)
    torch.testing.assert_close(latents, pipe.vae.encode(images).latent * 0.41407)
    torch.testing.assert_close(teacher.decode_latents(latents), pipe.vae.decode(latents / 0.41407).sample)


def test_sprint_teacher_feeds_t_without_guidance(tiny):
    path = tiny("sana_sprint")
    teacher, pipe = load_teacher(path), load_pipe(path)
    assert teacher.family == "sana_sprint" and teacher.denoiser.time_scale == 1.0
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, complex_human_instruction=chi())
    x_t = torch.randn(2, *teacher.latent_shape(32), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.25, 0.7])
    v_ref = pipe.transformer(
        x_t, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t, return_dict=False
    )[0]
    v, feats = teacher.denoiser.velocity_and_features(x_t, t, teacher.encode_prompts(PROMPTS))
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=0)
    assert feats.shape == (2, 16)
