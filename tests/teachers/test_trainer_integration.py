"""SiD through the core trainer on tiny real-architecture teachers (every family).

The reference generator gradient is written with plain diffusers calls only — the pipeline's own
``encode_prompt``, FLUX packing/ids by hand, the raw transformer with each family's timestep — and
the SiD loss of spec 5 written out, for the trainer's own keyed draws.
"""

from __future__ import annotations

import pytest
import torch
from helpers import generator_gradients

from sidflow.config import GeneratorConfig, GuidanceConfig, OptimConfig, SiDConfig, TrainConfig
from sidflow.core import rng
from sidflow.data.prompts import PromptSource
from sidflow.teachers import load_teacher
from sidflow.teachers.sana import default_complex_human_instruction
from sidflow.testing import FAMILIES
from sidflow.trainer import SiDTrainer

PROMPTS = ["a red cat", "two dogs on a hill", "a blue house"]
KAPPA, FLUX_EMBEDDED = 4.5, 3.5
DTYPE = torch.float64  # transformers and draws in double: the comparison isolates the adapter's logic


def _encode_by_hand(family, pipe, prompts):
    if family in ("sd3", "sd35"):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=77
        )
        return embeds, pooled
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=512)
        return embeds, pooled
    chi = default_complex_human_instruction() if prompts[0] else None
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, complex_human_instruction=chi)
    return embeds, mask


def _raw_velocity(family, pipe, transformer, x, t, text, guidance):
    text = tuple(e.to(DTYPE) if e.is_floating_point() else e for e in text)  # as the pipelines cast
    if family in ("sd3", "sd35"):
        return transformer(
            hidden_states=x,
            timestep=1000 * t,
            encoder_hidden_states=text[0],
            pooled_projections=text[1],
            return_dict=False,
        )[0]
    if family == "flux":
        b, c, h, w = x.shape
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        out = transformer(
            hidden_states=pipe._pack_latents(x, b, c, h, w),
            timestep=t,
            guidance=torch.full((b,), guidance, dtype=DTYPE),
            pooled_projections=text[1],
            encoder_hidden_states=text[0],
            txt_ids=torch.zeros(text[0].shape[1], 3, dtype=DTYPE),
            img_ids=ids,
            return_dict=False,
        )[0]
        factor = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * factor, w * factor, factor)
    scale = 1.0 if family == "sana_sprint" else 1000.0
    return transformer(
        x, encoder_hidden_states=text[0], encoder_attention_mask=text[1], timestep=scale * t, return_dict=False
    )[0]


def _reference_generator_grads(family, trainer, pipe, iteration):
    """Spec 3.2 + 5 by hand with raw transformers; returns d loss / d theta."""
    d, k = trainer.draw("gen", iteration, 0), trainer.k_for(iteration)
    num_steps = trainer.config.generator.num_steps
    picks = rng.randint_per_sample(
        len(PROMPTS), seed=trainer.config.train.seed, iteration=iteration, stream="gen", indices=d.indices
    )
    text = _encode_by_hand(family, pipe, [PROMPTS[int(i)] for i in picks])
    empty = _encode_by_hand(family, pipe, [""] * len(picks))
    nets = (trainer.generator, trainer.fake, trainer.teacher)
    gen_tf, fake_tf, teacher_tf = (net.transformer for net in nets)
    x0 = torch.zeros_like(d.z)
    for i in range(k):
        t_i = 1.0 - i / num_steps
        x_i = (1 - t_i) * x0 + t_i * (d.z if i == 0 else d.fresh[i - 1])
        with torch.set_grad_enabled(i == k - 1):
            t_full = torch.full((len(picks),), t_i, dtype=DTYPE)
            x0 = x_i - t_i * _raw_velocity(family, pipe, gen_tf, x_i, t_full, text, 1.0)
    x_g, t = x0, d.t
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x_g + tb * d.eps

    def y(transformer):
        v_c = _raw_velocity(family, pipe, transformer, x_t, t, text, FLUX_EMBEDDED)
        v_u = _raw_velocity(family, pipe, transformer, x_t, t, empty, FLUX_EMBEDDED)
        return x_t - tb * (v_u + KAPPA * (v_c - v_u))

    y_real, y_fake = y(teacher_tf), y(fake_tf)
    loss = 100.0 * ((y_real - y_fake) * (y_fake - x_g) * (1 - tb)).sum() / trainer.batch_rank
    return torch.autograd.grad(loss, list(gen_tf.parameters()), allow_unused=True)


def _trainer(family, tiny, num_steps):
    teacher = load_teacher(tiny(family), dtype=DTYPE, text_encoder_dtype=torch.float32)
    psi, phi, theta = teacher.make_denoisers()
    config = SiDConfig(
        generator=GeneratorConfig(num_steps=num_steps),
        guidance=GuidanceConfig(
            kappa1=KAPPA, kappa2=KAPPA, kappa4=KAPPA, embedded_teacher=FLUX_EMBEDDED if family == "flux" else None
        ),
        optim=OptimConfig(lr=1e-4, glr=1e-4),
        train=TrainConfig(batch=2, batch_gpu=2, seed=7),
    )
    conds = PromptSource(PROMPTS, teacher)
    return teacher, SiDTrainer(psi, phi, theta, conds, teacher.latent_shape(32), config)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_steps", [1, 4])
def test_sid_through_trainer(family, num_steps, tiny):
    teacher, trainer = _trainer(family, tiny, num_steps)
    before = {n: p.detach().clone() for n, p in trainer.teacher.named_parameters()}
    iteration = next(i for i in range(50) if trainer.k_for(i) == num_steps)  # exercise all k steps
    trainer.fake_phase(iteration)
    generator_gradients(trainer, iteration)
    got = [p.grad for p in trainer.generator.transformer.parameters()]
    ref = _reference_generator_grads(family, trainer, teacher.pipe, iteration)
    scale = max(float(r.abs().max()) for r in ref if r is not None)
    assert scale > 0
    for g, r in zip(got, ref, strict=True):
        if r is None:
            assert g is None or not g.any()
            continue
        assert float((g - r).abs().max()) <= 1e-5 * max(1.0, scale)
    for net in (trainer.teacher, trainer.fake):
        assert all(p.grad is None for p in net.parameters())
    trainer.opt_gen.zero_grad(set_to_none=True)
    for _ in range(2):
        metrics = trainer.step()
        assert torch.isfinite(torch.tensor([metrics["loss_fake"], metrics["loss_gen"]])).all()
    for name, p in trainer.teacher.named_parameters():
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in trainer.generator.named_parameters())
