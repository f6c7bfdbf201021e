"""LoRA mode (sidflow.teachers.lora): one shared base against three full copies, adapter switching
under gradient checkpointing, and what the views expose."""

from __future__ import annotations

import pytest
import torch
from helpers import generator_gradients

from sidflow.config import GeneratorConfig, GuidanceConfig, LoraConfig, OptimConfig, SiDConfig, TrainConfig
from sidflow.core import rng
from sidflow.data.prompts import PromptSource
from sidflow.errors import ConfigError
from sidflow.teachers import load_teacher
from sidflow.teachers.lora import adapter_of, lora_spec, target_modules
from sidflow.trainer import SiDTrainer

PROMPTS = ["a red cat", "two dogs on a hill", "a blue house"]
DTYPE = torch.float64


def _spec(family_targets, share_base: str, **kw):
    spec = lora_spec(LoraConfig(rank=4, alpha=8, share_base=share_base, **kw), family_targets)
    assert spec is not None
    return spec


@torch.no_grad()
def _perturb_adapters(nets) -> None:
    """Non-zero B (and A) in every adapter, keyed by name: fake, generator and teacher all differ, so
    a pass run under the wrong adapter changes the numbers."""
    seen = set()
    for net in nets:
        for key, p in torch.nn.Module.named_parameters(net):
            if adapter_of(key) is not None and id(p) not in seen:
                seen.add(id(p))
                g = rng.keyed_generator(11, key)
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _trainer(family, tiny, *, share_base: str, checkpointing: bool, **lora_kw):
    teacher = load_teacher(tiny(family), dtype=DTYPE, text_encoder_dtype=torch.float32)
    spec = _spec(teacher.denoiser.lora_targets, share_base, **lora_kw)
    nets = teacher.make_denoisers(gradient_checkpointing=checkpointing, lora=spec, seed=3)
    _perturb_adapters(nets)
    config = SiDConfig(
        generator=GeneratorConfig(num_steps=2),
        guidance=GuidanceConfig(kappa1=2.0, kappa2=2.0, kappa4=2.0, embedded_teacher=3.5 if family == "flux" else None),
        optim=OptimConfig(lr=1e-3, glr=1e-3),
        train=TrainConfig(batch=2, batch_gpu=2, seed=5),
    )
    trainer = SiDTrainer(*nets, PromptSource(PROMPTS, teacher), teacher.latent_shape(32), config)
    return teacher, trainer


def _one_iteration(trainer):
    iteration = next(i for i in range(50) if trainer.k_for(i) == 2)  # the step with both a no-grad and a grad pass
    trainer.fake_phase(iteration)
    generator_gradients(trainer, iteration)
    grads = {n: p.grad.clone() for n, p in trainer.generator.named_parameters()}
    fake = {n: p.detach().clone() for n, p in trainer.fake.named_parameters()}
    return grads, fake


def _base(trainer):
    return {n: p.detach().clone() for n, p in trainer.teacher.named_parameters()}


def _assert_close(a: dict, b: dict, rtol: float = 1e-9) -> None:
    assert set(a) == set(b)
    scale = max(float(v.abs().max()) for v in b.values())
    assert scale > 0
    for key in a:
        assert float((a[key] - b[key]).abs().max()) <= rtol * scale, key


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux", "sana"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_base_equals_full_copies(family, checkpointing, tiny):
    _, separate = _trainer(family, tiny, share_base="off", checkpointing=False)
    _, shared = _trainer(family, tiny, share_base="on", checkpointing=checkpointing)
    # one base: the three views share every base weight; each adapter view exposes only its adapter
    assert shared.teacher.transformer is shared.fake.transformer is shared.generator.transformer
    assert separate.teacher.transformer is not separate.generator.transformer
    assert all(adapter_of(n) == "generator" for n, _ in shared.generator.named_parameters())
    assert all(adapter_of(n) == "fake" for n in shared.fake.state_dict())
    assert all(adapter_of(n) is None for n, _ in shared.teacher.named_parameters())
    base_before = _base(shared)
    grads_sep, fake_sep = _one_iteration(separate)
    grads_sh, fake_sh = _one_iteration(shared)
    _assert_close(fake_sh, fake_sep)
    _assert_close(grads_sh, grads_sep)
    shared.step()  # and a whole iteration with both Adam steps: the base never moves
    for key, value in _base(shared).items():
        assert torch.equal(value, base_before[key]), key
    assert all(p.grad is None for p in shared.teacher.parameters())


@pytest.mark.slow
def test_critic_checkpointing_off_equals_recompute(tiny):
    _, recompute = _trainer("sd3", tiny, share_base="on", checkpointing=True)
    _, off = _trainer("sd3", tiny, share_base="on", checkpointing=True, critic_checkpointing="off")
    _assert_close(_one_iteration(off)[0], _one_iteration(recompute)[0])


@pytest.mark.slow
def test_plain_checkpointing_on_a_shared_base_is_wrong(tiny):
    """Negative control (spec 16): diffusers' own checkpoint function recomputes the critics' passes
    under whichever adapter is active at backward time. Here the fake score's pass is recomputed with
    adapters off; torch notices the graph changed and stops, and where the graphs agree (one adapter
    recomputed as another) the gradients come out silently wrong."""
    from torch.utils.checkpoint import CheckpointError

    _, separate = _trainer("sd3", tiny, share_base="off", checkpointing=False)
    _, naive = _trainer("sd3", tiny, share_base="on", checkpointing=True)
    naive.generator.transformer.enable_gradient_checkpointing()  # the default function, no adapter state
    grads_ref, _ = _one_iteration(separate)
    try:
        grads_naive, _ = _one_iteration(naive)
    except CheckpointError:
        return
    worst = max(float((grads_naive[k] - grads_ref[k]).abs().max()) for k in grads_ref)
    assert worst > 1e-4 * max(float(v.abs().max()) for v in grads_ref.values())


def test_teacher_view_is_the_base(tiny):
    plain = load_teacher(tiny("sd3"), dtype=DTYPE, text_encoder_dtype=torch.float32)
    teacher, trainer = _trainer("sd3", tiny, share_base="on", checkpointing=False)
    x = torch.randn(2, *teacher.latent_shape(32), generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    t = torch.tensor([0.3, 0.8], dtype=DTYPE)
    cond = plain.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        v_base = plain.denoiser.velocity(x, t, cond)
        v_teacher = trainer.teacher.velocity(x, t, cond)
        v_gen = trainer.generator.velocity(x, t, cond)
        v_teacher_again = trainer.teacher.velocity(x, t, cond)
    assert torch.equal(v_teacher, v_base)
    assert torch.equal(v_teacher_again, v_base)  # the switch is restored after each view's pass
    assert not torch.allclose(v_gen, v_base)


def test_targets_and_bad_settings(tiny):
    teacher = load_teacher(tiny("flux"), dtype=torch.float32)
    names = target_modules(teacher.denoiser.transformer, teacher.denoiser.fsdp_blocks, teacher.denoiser.lora_targets)
    assert "proj_out" not in names  # the final projection is not a block layer
    assert any(n.startswith("single_transformer_blocks.") and n.endswith(".proj_out") for n in names)
    assert any(n.endswith("attn.to_q") for n in names) and any(n.endswith("ff.net.2") for n in names)
    with pytest.raises(ConfigError, match="lora.targets=nothing_here matches no linear layer"):
        target_modules(teacher.denoiser.transformer, teacher.denoiser.fsdp_blocks, ("nothing_here",))
    with pytest.raises(ConfigError, match="lora.rank=-1"):
        LoraConfig(rank=-1)
    assert lora_spec(LoraConfig(), ("to_q",)) is None


@pytest.mark.slow
@pytest.mark.parametrize(("family", "adaln"), [("sd3", False), ("sd3", True), ("flux", False), ("sana", False)])
def test_exported_lora_and_merged_pipeline_reproduce_sidflow(family, adaln, tiny, tmp_path):
    """The generator's LoRA alone, loaded into the stock pipeline with ``load_lora_weights`` (and the
    merged pipeline folder), gives sidflow's samples for the same noise at 1 and 2 steps; also with
    the AdaLN modulation layers targeted (the digits-lora preset's targets)."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from sidflow.core.generator import generate, generator_step_times
    from sidflow.core.guidance import with_embedded_guidance
    from sidflow.run.export import LORA_FILE, SETTINGS_FILE, export_generator, export_lora
    from sidflow.testing import load_pipeline

    teacher = load_teacher(tiny(family), dtype=torch.float32)
    targets = (*teacher.denoiser.lora_targets, "norm1.linear", "norm1_context.linear") if adaln else None
    nets = teacher.make_denoisers(lora=_spec(teacher.denoiser.lora_targets, "on", targets=targets), seed=3)
    _perturb_adapters(nets)
    generator = nets[2].requires_grad_(False)
    config = SiDConfig(generator=GeneratorConfig(num_steps=2, noise_type="ddim"), lora=LoraConfig(rank=4, alpha=8))
    lora_dir = export_lora(teacher, generator, tmp_path / "lora", config)
    merged_dir = export_generator(teacher, generator, tmp_path / "merged", config)
    assert (lora_dir / LORA_FILE).is_file()
    settings = json.loads((lora_dir / SETTINGS_FILE).read_text())
    # sidflow's side: the generator view on the shared base; FLUX gets its embedded guidance in cond
    prompts, shape = ["a red cat", "a blue house"], teacher.latent_shape(32)
    cond = with_embedded_guidance(teacher.encode_prompts(prompts), 1.0 if family == "flux" else None)
    z = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4))
    step_times = generator_step_times(2, 1.0, None)
    stock_lora = load_pipeline(tiny(family))
    stock_lora.scheduler = FlowMatchEulerDiscreteScheduler(**settings["scheduler"])
    stock_lora.load_lora_weights(str(lora_dir), weight_name=LORA_FILE)
    merged = type(stock_lora).from_pretrained(str(merged_dir))
    extra = {"max_sequence_length": teacher.max_sequence_length, "guidance_scale": 1.0}
    for steps in (1, 2):
        with torch.no_grad():
            ours = generate(generator, cond, shape, steps=steps, step_times=step_times, noise_type="ddim", z=z)
        for pipe in (stock_lora, merged):
            latents = z if family != "flux" else pipe._pack_latents(z, 2, shape[0], shape[1], shape[2])
            out = pipe(
                prompts,
                sigmas=settings["sigmas"][:steps],
                latents=latents,
                height=32,
                width=32,
                output_type="latent",
                **extra,
            ).images
            if family == "flux":
                out = pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
            torch.testing.assert_close(out, ours, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_lora_checkpoint_holds_adapters_only_and_resumes_exactly(tiny, tmp_path):
    from sidflow.config import to_dict
    from sidflow.run.checkpoint import read_generator, resume_trainer, save_trainer

    teacher = load_teacher(tiny("sd3"), dtype=torch.float32)
    spec = _spec(teacher.denoiser.lora_targets, "on")
    config = SiDConfig(
        generator=GeneratorConfig(num_steps=2),
        optim=OptimConfig(lr=1e-3, glr=1e-3),
        train=TrainConfig(batch=2, batch_gpu=1, seed=5, ema_halflife_kimg=0.01),
        lora=LoraConfig(rank=4, alpha=8),
    )

    def trainer(seed):
        nets = teacher.make_denoisers(lora=spec, seed=seed) if seed == 3 else _fresh_views(tiny, spec, seed)
        return SiDTrainer(*nets, PromptSource(PROMPTS, teacher), teacher.latent_shape(32), config)

    a = trainer(3)
    for _ in range(2):
        a.step()
    path = save_trainer(a, tmp_path, to_dict(config), is_main=True, sharded=False)
    assert path is not None
    saved = read_generator(path)
    assert saved and all(adapter_of(k) == "generator" for k in saved)  # no base weight in a checkpoint
    b = trainer(9)  # other adapter weights: everything must come from the checkpoint
    assert resume_trainer(b, tmp_path, rank=0, sharded=False) == path
    for _ in range(2):
        a.step(), b.step()
    for (ka, va), (kb, vb) in zip(a.state_dict()["tensors"].items(), b.state_dict()["tensors"].items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def _fresh_views(tiny, spec, seed):
    other = load_teacher(tiny("sd3"), dtype=torch.float32)
    return other.make_denoisers(lora=spec, seed=seed)


def test_merge_is_fp32_on_the_host_and_leaves_the_shared_base_alone(tiny):
    """Under amp_bf16 the base is bf16: the merged export adds the adapter in fp32 (a bf16 merge would
    round the small update away), builds a new host copy, and leaves the live base as it was."""
    from sidflow.teachers.lora import fused_transformer

    teacher = load_teacher(tiny("sd3"), dtype=torch.float32)
    nets = teacher.make_denoisers(lora=_spec(teacher.denoiser.lora_targets, "on"), precision="amp_bf16")
    _perturb_adapters(nets)
    shared = nets[2].transformer
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    fused = fused_transformer(shared, "generator")
    layer = "transformer_blocks.0.attn.to_q"
    base = before[f"{layer}.base_layer.weight"]
    a, b = before[f"{layer}.lora_A.generator.weight"], before[f"{layer}.lora_B.generator.weight"]
    assert base.dtype == torch.bfloat16 and a.dtype == torch.float32
    want = base.float() + (8 / 4) * b @ a
    got = fused.state_dict()[f"{layer}.weight"]
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not any(".lora_" in k or ".base_layer." in k for k in fused.state_dict())
    after = shared.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the shared base still has its adapters


def test_checkpoint_recompute_context_survives_a_second_backward(tiny):
    teacher = load_teacher(tiny("sd3"), dtype=DTYPE, text_encoder_dtype=torch.float32)
    nets = teacher.make_denoisers(lora=_spec(teacher.denoiser.lora_targets, "on"), gradient_checkpointing=True)
    _perturb_adapters(nets)
    x = torch.randn(1, *teacher.latent_shape(32), dtype=DTYPE, requires_grad=True)
    out = nets[1].velocity(x, torch.tensor([0.5], dtype=DTYPE), teacher.encode_prompts(["a cat"])).sum()
    (first,) = torch.autograd.grad(out, x, retain_graph=True)
    (second,) = torch.autograd.grad(out, x)
    assert torch.equal(first, second)
