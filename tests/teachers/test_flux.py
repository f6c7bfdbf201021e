"""FLUX adapter against the stock diffusers FluxPipeline of the same tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from sidflow.core.guidance import with_embedded_guidance
from sidflow.core.sampling import euler_sample
from sidflow.teachers import load_teacher
from sidflow.teachers.flux import image_ids, pack_latents, unpack_latents
from sidflow.testing import load_pipeline as load_pipe

PROMPTS = ["a red cat", "two dogs on a hill"]


@pytest.fixture(scope="module")
def pair(tiny):
    path = tiny("flux")
    return load_teacher(path), load_pipe(path)


def _unpack_ref(pipe, packed):
    return pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)


@pytest.mark.parametrize("num_steps,g", [(1, 1.0), (4, 3.5)])
def test_euler_sampler_reproduces_pipeline_embedded_guidance(pair, num_steps, g):
    teacher, pipe = pair
    ref = pipe(
        PROMPTS,
        height=32,
        width=32,
        num_inference_steps=num_steps,
        guidance_scale=g,
        output_type="latent",
        generator=torch.Generator().manual_seed(2),
    ).images
    shape = teacher.latent_shape(32)
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(2))
    cond = with_embedded_guidance(teacher.encode_prompts(PROMPTS), g)
    out = euler_sample(teacher.denoiser, noise, teacher.sigmas(num_steps, shape), cond)
    torch.testing.assert_close(out, _unpack_ref(pipe, ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(pack_latents(out), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_euler_sampler_reproduces_pipeline_true_cfg(pair, num_steps):
    teacher, pipe = pair
    ref = pipe(
        PROMPTS,
        negative_prompt=["", ""],
        true_cfg_scale=4.0,
        guidance_scale=2.0,
        height=32,
        width=32,
        num_inference_steps=num_steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(4),
    ).images
    shape = teacher.latent_shape(32)
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(4))
    cond = with_embedded_guidance(teacher.encode_prompts(PROMPTS), 2.0)
    uncond = with_embedded_guidance(teacher.uncond(2), 2.0)
    out = euler_sample(teacher.denoiser, noise, teacher.sigmas(num_steps, shape), cond, uncond, 4.0)
    torch.testing.assert_close(out, _unpack_ref(pipe, ref), atol=1e-5, rtol=0)


def test_packing_and_ids_match_diffusers(pair):
    _, pipe = pair
    x = torch.randn(2, 4, 8, 12)
    packed = pipe._pack_latents(x, 2, 4, 8, 12)
    torch.testing.assert_close(pack_latents(x), packed, atol=0, rtol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 12), x, atol=0, rtol=0)
    ref_ids = pipe._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(4, 6, "cpu", torch.float32), ref_ids, atol=0, rtol=0)


def test_x0_and_scheduler_step_match_plain_diffusers(pair):
    teacher, pipe = pair
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=512)
    shape = teacher.latent_shape(32)
    x_t = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    sigmas = teacher.sigmas(4, shape)
    pipe.scheduler.set_timesteps(sigmas=sigmas[:-1].numpy(), mu=0.0)  # the same schedule, as given
    timestep = pipe.scheduler.timesteps[1].expand(2)
    img_ids = pipe._prepare_latent_image_ids(2, shape[1] // 2, shape[2] // 2, "cpu", torch.float32)
    packed = pipe._pack_latents(x_t, 2, 4, *shape[1:])
    v_ref = pipe.transformer(
        hidden_states=packed,
        timestep=timestep / 1000,
        guidance=torch.full((2,), 3.0),
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    t = sigmas[1].expand(2)
    v = teacher.denoiser.velocity(x_t, t, with_embedded_guidance(teacher.encode_prompts(PROMPTS), 3.0))
    torch.testing.assert_close(pack_latents(v), v_ref, atol=1e-5, rtol=0)
    step_ref = pipe.scheduler.step(
        v_ref, pipe.scheduler.timesteps[1], pipe._pack_latents(x_t, 2, 4, 16, 16), return_dict=False
    )[0]
    torch.testing.assert_close(pack_latents(x_t + (sigmas[2] - sigmas[1]) * v), step_ref, atol=1e-5, rtol=0)
    x0 = x_t - t.view(-1, 1, 1, 1) * v
    torch.testing.assert_close(
        pack_latents(x0), pipe._pack_latents(x_t, 2, 4, 16, 16) - sigmas[1] * v_ref, atol=1e-5, rtol=0
    )


def test_features_are_image_tokens_after_norm_out(pair):
    teacher, _ = pair
    x_t = torch.randn(2, *teacher.latent_shape(32))
    v, feats = teacher.denoiser.velocity_and_features(x_t, torch.tensor([0.2, 0.9]), teacher.encode_prompts(PROMPTS))
    config = teacher.denoiser.transformer.config
    assert feats.shape == (2, config.num_attention_heads * config.attention_head_dim)
    assert v.shape == x_t.shape and torch.isfinite(feats).all()


def test_vae_scaling_and_shift(pair):
    teacher, pipe = pair
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = teacher.encode_images(images, generator=torch.Generator().manual_seed(5))
    z = pipe.vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, (z - 0.1159) * 0.3611)
    torch.testing.assert_close(teacher.decode_latents(latents), pipe.vae.decode(z).sample)
