"""train.precision: bf16 autocast over fp32 masters (amp_bf16), bf16 weights with stochastic-rounding
Adam (pure_bf16), and their defaults (spec 6.3)."""

from __future__ import annotations

import pytest
import torch
from helpers import generator_gradients  # noqa: I001  (tests/ on the path)

from sidflow.config import GeneratorConfig, GuidanceConfig, LoraConfig, OptimConfig, SiDConfig, TrainConfig
from sidflow.data.prompts import PromptSource
from sidflow.optim import StochasticRoundingAdam, resolve_precision, stochastic_round_to_bf16
from sidflow.teachers import load_teacher
from sidflow.teachers.lora import lora_spec
from sidflow.trainer import SiDTrainer


def test_auto_is_fp32_on_cpu_and_amp_on_cuda():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "amp_bf16"
    assert resolve_precision("pure_bf16", "cpu") == "pure_bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")


def test_stochastic_rounding_is_exact_on_bf16_values_and_unbiased_between_them():
    exact = torch.tensor([0.0, 1.0, -2.5, 0.015625, 3.0e-5]).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)
    lo = torch.tensor(0.02).to(torch.bfloat16).float()
    hi = torch.nextafter(lo.to(torch.bfloat16), torch.tensor(1.0, dtype=torch.bfloat16)).float()
    x = torch.full((100_000,), float(lo + 0.3 * (hi - lo)))
    out = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(out.unique().tolist()) == {float(lo), float(hi)}  # only the two neighbours
    assert (out == hi).float().mean().item() == pytest.approx(0.3, abs=0.01)  # up with p = remainder
    assert out.mean().item() == pytest.approx(x[0].item(), rel=1e-4)


def test_pure_bf16_weights_move_at_lr_5e6_where_plain_bf16_adam_does_not():
    """The issue's check: 1,000 weights of 0.02 after 100 Adam steps at lr 5e-6."""
    grads = torch.where(torch.arange(1000) % 2 == 0, 1.0, -1.0)

    def run(opt_cls, dtype, **kw):
        p = torch.nn.Parameter(torch.full((1000,), 0.02, dtype=dtype))
        opt = opt_cls([p], lr=5e-6, betas=(0.0, 0.999), eps=1e-4, **kw)
        for _ in range(100):
            p.grad = grads.to(dtype)
            opt.step()
        return p.detach().float()

    start = torch.tensor(0.02, dtype=torch.bfloat16).float()
    plain = run(torch.optim.Adam, torch.bfloat16)
    assert int((plain != start).sum()) == 0  # every update rounded away
    fp32 = run(torch.optim.Adam, torch.float32)
    rounded = run(StochasticRoundingAdam, torch.bfloat16, seed=1)
    assert int((rounded != start).sum()) > 900
    drift_fp32, drift_sr = (fp32 - 0.02) * grads, (rounded - start) * grads
    assert drift_sr.mean().item() == pytest.approx(drift_fp32.mean().item(), rel=0.1)  # unbiased on average


def _sd3_trainer(tiny, precision: str, lora: bool = False, **optim):
    teacher = load_teacher(
        tiny("sd3"),
        text_encoder_dtype=torch.float32,
        dtype=torch.bfloat16 if precision == "pure_bf16" else torch.float32,
    )
    spec = lora_spec(LoraConfig(rank=4, alpha=8), teacher.denoiser.lora_targets) if lora else None
    networks = teacher.make_denoisers(precision=precision, lora=spec, gradient_checkpointing=lora)
    config = SiDConfig(
        generator=GeneratorConfig(num_steps=2),
        guidance=GuidanceConfig(kappa1=2.0, kappa2=2.0, kappa4=2.0),
        optim=OptimConfig(lr=1e-4, glr=1e-4, **optim),
        train=TrainConfig(batch=4, batch_gpu=4, seed=5, precision=precision),
    )
    conds = PromptSource(["a red cat", "a blue house", "two dogs"], teacher)
    return SiDTrainer(*networks, conds, teacher.latent_shape(32), config)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_amp_bf16_gradients_match_fp32_to_bf16_precision(tiny, lora):
    """Also in LoRA mode (shared base with checkpointing): the base is stored in bf16, the adapters
    keep fp32 masters."""
    fp32, amp = _sd3_trainer(tiny, "fp32", lora), _sd3_trainer(tiny, "amp_bf16", lora)
    assert all(p.dtype == torch.bfloat16 for p in amp.teacher.parameters())  # frozen teacher/base in bf16
    assert all(p.dtype == torch.float32 for p in amp.gen_params)  # fp32 master weights
    # at initialisation fake == teacher, so the fp32 SiD gradient is ~0 and bf16 rounding would be all
    # of the amp one: first move the fake score well away from the teacher (three phases at lr 5e-3)
    for trainer in (fp32, amp):
        for group in trainer.opt_fake.param_groups:
            group["lr"] = 5e-3
        for it in range(3):
            trainer.fake_phase(it)
    generator_gradients(fp32, 1)
    generator_gradients(amp, 1)
    g32 = torch.cat([p.grad.flatten() for p in fp32.gen_params])
    g16 = torch.cat([p.grad.flatten() for p in amp.gen_params])
    assert g16.dtype == torch.float32
    rel = ((g16 - g32).norm() / g32.norm()).item()
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
    # bf16 keeps 8 significant bits (0.4 % per value); the SiD gradient multiplies the small difference
    # y_teacher - y_fake, so its relative error is that 0.4 % over the difference's relative size
    assert 0 < rel < 0.1 and cos > 0.998, (rel, cos)  # measured: rel 0.059, cos 0.9992


def test_pure_bf16_defaults_and_overrides(tiny):
    pure = _sd3_trainer(tiny, "pure_bf16")
    assert all(p.dtype == torch.bfloat16 for p in pure.gen_params)
    assert isinstance(pure.opt_gen, StochasticRoundingAdam)
    assert pure.opt_gen.param_groups[0]["eps"] == 1e-4 and pure.grad_clip == 1.0  # the reference's defaults
    before = [p.detach().clone() for p in pure.gen_params]
    metrics = pure.step()
    assert torch.isfinite(metrics["loss_gen"]) and any(
        not torch.equal(a, p) for a, p in zip(before, pure.gen_params, strict=True)
    )
    explicit = _sd3_trainer(tiny, "pure_bf16", eps=1e-6, grad_clip=0.0)
    assert explicit.opt_gen.param_groups[0]["eps"] == 1e-6 and not explicit.grad_clip
    fp32 = _sd3_trainer(tiny, "fp32")
    assert isinstance(fp32.opt_gen, torch.optim.Adam) and fp32.opt_gen.param_groups[0]["eps"] == 1e-8
    assert fp32.grad_clip is None
