"""SiDTrainer: the SiD gradient end to end with linear denoisers, accumulation, keyed draws, guards."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from helpers import generator_gradients  # noqa: I001  (tests/ on the path)
from torch import nn

from sidflow.config import (
    GANConfig,
    GeneratorConfig,
    GuidanceConfig,
    LossConfig,
    OptimConfig,
    SiDConfig,
    TrainConfig,
)
from sidflow.core.denoiser import Cond
from sidflow.core.schedule import ema_beta, lr_factor
from sidflow.errors import ConfigError, NonFiniteError
from sidflow.toy import GMMCondSource, GMMDenoiser, MLPDenoiser, make_mixture
from sidflow.trainer import SiDTrainer

D64 = torch.float64
DIM = 3


class LinearX0(nn.Module):
    """x0 = A_c x_t + b_c for label 1 (cond), A_u x_t + b_u for label 0 (uncond); v = (x_t - x0)/t."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(2, DIM, DIM, generator=g, dtype=D64) * 0.4)
        self.b = nn.Parameter(torch.randn(2, DIM, generator=g, dtype=D64))

    def x0(self, x_t, labels):
        return torch.einsum("bij,bj->bi", self.A[labels], x_t) + self.b[labels]

    def velocity(self, x_t, t, cond):
        return (x_t - self.x0(x_t, cond["label"])) / t.view(-1, 1)


class ConstGenerator(nn.Module):
    """Outputs x0 = P whatever its input: x_g = P after one step."""

    def __init__(self):
        super().__init__()
        self.P = nn.Parameter(torch.tensor([0.3, -1.2, 0.7], dtype=D64))

    def velocity(self, x_t, t, cond):
        return (x_t - self.P) / t.view(-1, 1)


class OnesSource:
    """Every sample conditional (label 1); uncond is label 0."""

    def sample(self, *, seed, iteration, stream, indices):
        return Cond({"label": torch.ones(len(indices), dtype=torch.long)})

    def uncond(self, n):
        return Cond({"label": torch.zeros(n, dtype=torch.long)})


def _config(batch=4, batch_gpu=2, k2=2.0, k3=None, k4=3.0, alpha=1.0, alpha_k=None, **train):
    return SiDConfig(
        generator=GeneratorConfig(num_steps=1),
        loss=LossConfig(alpha=alpha, alpha_k=alpha_k),
        guidance=GuidanceConfig(kappa1=1.5, kappa2=k2, kappa3=k3, kappa4=k4),
        train=TrainConfig(batch=batch, batch_gpu=batch_gpu, seed=7, **train),
    )


def _guided_A(net, kappa):
    """CFG of a linear x0-predictor is linear: A_u + kappa (A_c - A_u), same for b."""
    A, b = net.A.detach(), net.b.detach()
    return A[0] + kappa * (A[1] - A[0]), b[0] + kappa * (b[1] - b[0])


@pytest.mark.parametrize(
    "k3,alpha,by_k", [(None, 1.0, False), (1.0, 1.0, False), (None, 1.2, False), (None, 1.2, True)]
)
def test_generator_gradient_matches_hand_formula(k3, alpha, by_k):
    teacher, fake, gen = LinearX0(1), LinearX0(2), ConstGenerator()
    # by_k: the alpha of k = 1 comes from loss.alpha_k, overriding a different loss.alpha
    cfg = _config(k3=k3, alpha=5.0, alpha_k=(alpha,)) if by_k else _config(k3=k3, alpha=alpha)
    tr = SiDTrainer(teacher, fake, gen, OnesSource(), (DIM,), cfg)
    generator_gradients(tr, 0)
    A_T, b_T = _guided_A(teacher, 3.0)
    A_F, b_F = _guided_A(fake, 2.0)
    A_F3, b_F3 = _guided_A(fake, cfg.guidance.kappa3_value)
    x_g, eye = gen.P.detach(), torch.eye(DIM, dtype=D64)
    expected = torch.zeros(DIM, dtype=D64)
    for r in range(tr.rounds):
        d = tr.draw("gen", 0, r)
        for i in range(len(d.indices)):
            t, s = float(d.t[i]), 1 - float(d.t[i])
            x_t = s * x_g + t * d.eps[i]
            y_r, y_f, y_f3 = A_T @ x_t + b_T, A_F @ x_t + b_F, A_F3 @ x_t + b_F3
            # l = dd . ee * w with dd = y_r - y_f, ee = (y_r - x_g) - alpha (y_r - y_f3); w = 1 - t
            dd, ee = y_r - y_f, (y_r - x_g) - alpha * (y_r - y_f3)
            J_dd, J_ee = s * (A_T - A_F), s * A_T - eye - alpha * s * (A_T - A_F3)
            expected += cfg.loss.lsg / tr.batch_rank * s * (J_dd.T @ ee + J_ee.T @ dd)
    assert torch.allclose(gen.P.grad, expected, atol=1e-10, rtol=0)
    assert teacher.A.grad is None and fake.A.grad is None and fake.b.grad is None
    assert not any(p.requires_grad for p in teacher.parameters())


def test_detached_prediction_would_fail_the_gradient_check(monkeypatch):
    import sidflow.trainer as trainer_mod

    teacher, fake, gen = LinearX0(1), LinearX0(2), ConstGenerator()
    tr = SiDTrainer(teacher, fake, gen, OnesSource(), (DIM,), _config())
    generator_gradients(tr, 0)
    good = gen.P.grad.clone()
    orig = trainer_mod.guided_x0
    monkeypatch.setattr(trainer_mod, "guided_x0", lambda *a, **k: orig(*a, **k).detach())
    gen.P.grad = None
    generator_gradients(tr, 0)
    assert (gen.P.grad - good).abs().max() > 1e-3


def _mlp_trainer(batch_gpu, *, rank=0, world_size=1, num_steps=3, real_source=None, **overrides):
    torch.manual_seed(0)
    mix = make_mixture("2d")
    mlp = MLPDenoiser((2,), 4, hidden=16, depth=2).double()
    sections = dict(
        generator=GeneratorConfig(num_steps=num_steps),
        guidance=GuidanceConfig(kappa1=2.0, kappa2=2.0, kappa4=2.5),
        optim=OptimConfig(lr=1e-3, glr=1e-3),
        train=TrainConfig(batch=8, batch_gpu=batch_gpu, seed=3),
    )
    cfg = SiDConfig(**{**sections, **overrides})
    return SiDTrainer(
        GMMDenoiser(mix),
        copy.deepcopy(mlp),
        copy.deepcopy(mlp),
        GMMCondSource(4),
        (2,),
        cfg,
        rank=rank,
        world_size=world_size,
        real_source=real_source,
    )


def test_accumulation_rounds_equal_one_big_round():
    small, big = _mlp_trainer(2), _mlp_trainer(8)
    assert (small.rounds, big.rounds) == (4, 1)
    for it in range(2):  # k differs per iteration; both phases, then the generator grads
        ms, mb = small.fake_phase(it), big.fake_phase(it)
        assert float(ms["loss_fake"]) == pytest.approx(float(mb["loss_fake"]), rel=1e-12)
        for ps, pb in zip(small.fake.parameters(), big.fake.parameters(), strict=True):
            assert torch.allclose(ps, pb, atol=1e-12)
        generator_gradients(small, it)
        generator_gradients(big, it)
        for ps, pb in zip(small.generator.parameters(), big.generator.parameters(), strict=True):
            assert torch.allclose(ps.grad, pb.grad, atol=1e-11, rtol=1e-9)


def test_draws_do_not_depend_on_micro_batch_or_rank():
    a, b = _mlp_trainer(2), _mlp_trainer(4)
    r1 = _mlp_trainer(2, rank=1, world_size=2)
    da = [a.draw("gen", 5, r) for r in range(4)]
    db = [b.draw("gen", 5, r) for r in range(2)]
    d1 = [r1.draw("gen", 5, r) for r in range(2)]
    for field in ("z", "eps", "t", "fresh"):
        cat = lambda ds, f=field: torch.cat([getattr(d, f) for d in ds], dim=1 if f == "fresh" else 0)  # noqa: E731
        assert torch.equal(cat(da), cat(db))
        assert torch.equal(cat(da[2:]), cat(d1))  # rank 1 of 2 holds global samples 4..7
    assert torch.equal(torch.cat([d.cond["label"] for d in da]), torch.cat([d.cond["label"] for d in db]))
    assert a.k_for(5) == r1.k_for(5)
    assert not torch.equal(a.draw("fake", 5, 0).eps, da[0].eps)  # phases draw independently


def test_k_is_uniform_by_default_and_follows_k_weights():
    uniform = _mlp_trainer(2, num_steps=4)
    counts = torch.bincount(torch.tensor([uniform.k_for(i) for i in range(4000)]), minlength=5)[1:]
    assert counts.min() > 900 and counts.max() < 1100  # 1000 each expected (sd ~27)
    weighted = _mlp_trainer(2, num_steps=4, generator=GeneratorConfig(num_steps=4, k_weights=(3, 0, 1, 0)))
    ks = torch.tensor([weighted.k_for(i) for i in range(4000)])
    assert set(ks.tolist()) == {1, 3}
    assert abs((ks == 1).float().mean().item() - 0.75) < 0.03
    rank1 = _mlp_trainer(
        2, num_steps=4, rank=1, world_size=2, generator=GeneratorConfig(num_steps=4, k_weights=(3, 0, 1, 0))
    )
    assert [rank1.k_for(i) for i in range(50)] == ks[:50].tolist()  # same k on every rank


def test_k_odds_move_linearly_to_k_weights_end():
    gc = GeneratorConfig(num_steps=2, k_weights=(3, 1), k_weights_end=(0, 2))
    assert gc.k_odds(0.0) == pytest.approx((0.75, 0.25))
    assert gc.k_odds(0.5) == pytest.approx((0.375, 0.625))
    assert gc.k_odds(1.0) == pytest.approx((0.0, 1.0))
    assert GeneratorConfig(num_steps=2, k_weights_end=(1, 0)).k_odds(0.5) == pytest.approx((0.75, 0.25))
    assert GeneratorConfig(num_steps=2, k_weights=(3, 1)).k_odds(0.9) == (3, 1)  # fixed odds, as given
    # in a run: k = 1 only at the start, k = 2 only at the end (100 iterations)
    tr = _mlp_trainer(
        2,
        num_steps=2,
        train=TrainConfig(batch=8, batch_gpu=2, seed=3, max_steps=100),
        generator=GeneratorConfig(num_steps=2, k_weights=(1, 0), k_weights_end=(0, 1)),
    )
    ks = torch.tensor([tr.k_for(i) for i in range(100)])
    assert tr.k_for(0) == 1 and tr.k_for(99) == 2
    assert (ks[:25] == 1).float().mean() > 0.6 and (ks[75:] == 2).float().mean() > 0.6


def test_alpha_k_picks_alpha_by_step_count_and_needs_one_value_per_k():
    loss = LossConfig(alpha=1.2, alpha_k=(1.0, 1.5, 1.5, 2.0))
    assert [loss.alpha_for(k) for k in (1, 2, 4)] == [1.0, 1.5, 2.0]
    assert LossConfig(alpha=1.2).alpha_for(3) == 1.2
    SiDConfig(generator=GeneratorConfig(num_steps=4), loss=loss)
    with pytest.raises(ConfigError, match="loss.alpha_k=1.0,1.5,1.5,2.0 needs 2 values"):
        SiDConfig(generator=GeneratorConfig(num_steps=2), loss=loss)


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, -1, 1, 1), (0, 0, 0, 0)])
@pytest.mark.parametrize("name", ["k_weights", "k_weights_end"])
def test_bad_k_weights_are_refused(weights, name):
    with pytest.raises(ConfigError, match=name):
        GeneratorConfig(num_steps=4, **{name: weights})


def test_step_metrics_requires_grad_and_frozen_teacher():
    tr = _mlp_trainer(4)
    teacher_before = [p.clone() for p in tr.teacher.parameters()]
    m = tr.step()
    assert {"loss_fake", "loss_gen", "k", "nonfinite_fake", "nonfinite_gen", "images_seen"} <= set(m)
    assert tr.iteration == 1 and tr.images_seen == 8
    generator_gradients(tr, 1)
    assert all(p.grad is None for p in tr.fake.parameters())
    assert all(p.grad is not None for p in tr.generator.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, tr.teacher.parameters(), strict=True))


class NaNOnLabel(nn.Module):
    """Wraps a denoiser and returns NaN velocity for samples of one label."""

    def __init__(self, inner, label):
        super().__init__()
        self.inner, self.label = inner, label

    def velocity(self, x_t, t, cond):
        v = self.inner.velocity(x_t, t, cond)
        bad = (cond["label"] == self.label).view(-1, 1)
        return torch.where(bad, torch.full_like(v, float("nan")), v)


def test_nonfinite_samples_are_counted_then_abort():
    tr = _mlp_trainer(8, train=TrainConfig(batch=8, batch_gpu=8, seed=3, max_nonfinite_frac=1.0))
    tr.teacher = NaNOnLabel(tr.teacher, label=0)
    labels = tr.draw("gen", 0, 0).cond["label"]
    m = tr.generator_phase(0)
    assert m["nonfinite_gen"] == int((labels == 0).sum()) > 0
    assert all(torch.isfinite(p).all() for p in tr.generator.parameters())
    strict = _mlp_trainer(8, train=TrainConfig(batch=8, batch_gpu=8, seed=3, max_nonfinite_frac=0.0))
    strict.teacher = NaNOnLabel(strict.teacher, label=0)
    with pytest.raises(NonFiniteError, match="non-finite"):
        strict.generator_phase(0)


def test_bad_batch_split_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple"):
        _mlp_trainer(4, world_size=3)


class RealGMM:
    def __init__(self, mixture):
        self.mixture = mixture

    def sample(self, *, seed, iteration, stream, indices):
        g = torch.Generator().manual_seed(seed * 1000 + iteration)
        labels = torch.randint(4, (len(indices),), generator=g)
        x, _ = self.mixture.sample(labels, g)
        return x.double(), Cond({"label": labels})


def test_sida_warmup_then_mixed_loss_runs():
    gan = GANConfig(mode="sida", warmup_kimg=0.008, mix_kimg=0.016)
    with pytest.raises(ConfigError, match="real_source"):
        _mlp_trainer(8, gan=gan)
    tr = _mlp_trainer(8, gan=gan, real_source=RealGMM(make_mixture("2d")))
    before = [p.clone() for p in tr.generator.parameters()]
    m0 = tr.step()  # images_seen 0 <= 8: warm-up, generator untouched
    assert m0["gen_updated"] == 0 and all(
        torch.equal(a, b) for a, b in zip(before, tr.generator.parameters(), strict=True)
    )
    tr.step()
    m2 = tr.step()  # images_seen 16 > mix: 0.5 SiD + 0.5 adversarial
    assert m2["gen_updated"] == 1 and torch.isfinite(torch.tensor([m2["loss_gen"], m2["loss_fake"]])).all()


def test_sida_adversarial_term_reaches_the_generator():
    """In the mixed phase the generator's gradient is (1 - mix) SiD + mix adversarial, and the
    adversarial part, computed alone, is a non-zero gradient through the fake score's features."""
    gan = GANConfig(mode="sida", warmup_kimg=0.0, mix_kimg=0.0, mix=0.5)
    real = RealGMM(make_mixture("2d"))

    def grads(trainer, gan_phase):
        trainer.opt_gen.zero_grad(set_to_none=True)
        d = trainer.draw("gen", 1, 0)
        per_sample, mask = trainer.generator_loss(d, 2, gan_phase)
        (per_sample[mask].sum() / trainer.batch_rank).backward()
        return torch.cat([p.grad.flatten() for p in trainer.gen_params])

    tr = _mlp_trainer(8, gan=gan, real_source=real)
    tr.images_seen = 8  # past the warm-up and the mix threshold
    assert tr._gan_phase() == "mix"
    mixed, sid = grads(tr, "mix"), grads(tr, "sid")
    adversarial = (mixed - 0.5 * sid) / 0.5
    assert adversarial.abs().max() > 1e-6  # the adversarial term moves the generator
    only_adv = _mlp_trainer(8, gan=dataclasses.replace(gan, mix=1.0), real_source=real)
    only_adv.images_seen = 8
    torch.testing.assert_close(grads(only_adv, "mix"), adversarial, rtol=1e-9, atol=1e-12)
    # gan.mix_k: the weight of this k = 2 iteration is mix_k[1], whatever gan.mix says
    by_k = _mlp_trainer(8, gan=dataclasses.replace(gan, mix=0.0, mix_k=(0.0, 1.0, 0.0)), real_source=real)
    by_k.images_seen = 8
    torch.testing.assert_close(grads(by_k, "mix"), adversarial, rtol=1e-9, atol=1e-12)
    # gan.mix_ramp_kimg: 8 images into a 16-image ramp, a weight of 1 counts half: the mix = 0.5 gradient
    ramped = _mlp_trainer(8, gan=dataclasses.replace(gan, mix=1.0, mix_ramp_kimg=0.016), real_source=real)
    ramped.images_seen = 8
    torch.testing.assert_close(grads(ramped, "mix"), mixed, rtol=1e-9, atol=1e-12)


def test_mix_k_needs_one_weight_per_k_in_zero_one():
    assert GANConfig(mix=0.5, mix_k=(0.6, 0.9)).mix_for(2) == 0.9 and GANConfig(mix=0.5).mix_for(2) == 0.5
    with pytest.raises(ConfigError, match="gan.mix_k=0.6,0.9 needs 4 values"):
        SiDConfig(generator=GeneratorConfig(num_steps=4), gan=GANConfig(mix_k=(0.6, 0.9)))
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        GANConfig(mix_k=(0.5, 1.5))


def test_mix_ramp_rises_linearly_after_mix_kimg():
    gan = GANConfig(mix=0.8, mix_kimg=2.0, mix_ramp_kimg=4.0)
    assert [gan.mix_for(1, n) for n in (1000, 2000, 4000, 6000, 9000)] == pytest.approx([0, 0, 0.4, 0.8, 0.8])
    assert GANConfig(mix_k=(0.6, 1.0), mix_kimg=0, mix_ramp_kimg=2).mix_for(2, 500) == 0.25
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="mix_ramp_kimg"):
            GANConfig(mix_ramp_kimg=bad)


def test_report_names_the_sida_schedule():
    from sidflow.run.report import _sida_line

    gan = GANConfig(mode="sida", warmup_kimg=1.0, mix_kimg=2.0, mix_k=(0.6, 0.85), mix_ramp_kimg=1.5)
    line = _sida_line(SiDConfig(generator=GeneratorConfig(num_steps=2), gan=gan))
    assert "generator frozen for 1k images, SiD alone until 2k images" in line
    assert line.endswith("adversarial weight by k 0.6:0.85 (reached over 1.5k images)")


def test_ema_matches_its_closed_form():
    """EMA after n steps with per-step decay beta: beta^n theta_0 + sum_i (1 - beta) beta^(n-i) theta_i."""
    tr = _mlp_trainer(8, train=TrainConfig(batch=8, batch_gpu=8, seed=3, ema_halflife_kimg=0.016))
    beta = 0.5**0.5  # a half-life of two batches of 8
    assert ema_beta(8, 0.016) == pytest.approx(beta, rel=1e-15)
    thetas = [{n: p.detach().clone() for n, p in tr.generator.named_parameters()}]
    for _ in range(3):
        tr.step()
        thetas.append({n: p.detach().clone() for n, p in tr.generator.named_parameters()})
    n = len(thetas) - 1
    for name in thetas[0]:
        expected = beta**n * thetas[0][name] + sum(
            (1 - beta) * beta ** (n - i) * thetas[i][name] for i in range(1, n + 1)
        )
        torch.testing.assert_close(tr.ema[name], expected, rtol=0, atol=1e-12)
        assert not torch.equal(tr.ema[name], thetas[-1][name])  # it lags the weights


def test_lr_factor_is_flat_then_linear_to_the_floor():
    # 10 iterations, decay over the last 40 %: iterations 6..9 fall 0.75, 0.5, 0.25, 0 (floor 0)
    assert [lr_factor(i, 10, 0.4) for i in range(10)] == [1.0] * 6 + [0.75, 0.5, 0.25, 0.0]
    assert lr_factor(9, 10, 0.4, decay_min=0.2) == pytest.approx(0.2)
    assert lr_factor(7, 10, 0.4, decay_min=0.2) == pytest.approx(1 - 0.8 * 0.5)
    assert all(lr_factor(i, 10, 0.0) == 1.0 for i in range(10))


def test_decay_tail_sets_both_learning_rates_from_the_iteration():
    tr = _mlp_trainer(
        8,
        optim=OptimConfig(lr=1e-3, glr=2e-3, decay_frac=0.5, decay_min=0.1),
        train=TrainConfig(batch=8, batch_gpu=8, seed=3, max_steps=4),
    )
    lrs = []
    for _ in range(4):
        metrics = tr.step()
        lrs.append((tr.opt_fake.param_groups[0]["lr"], tr.opt_gen.param_groups[0]["lr"], metrics["lr_factor"]))
    factors = [1.0, 1.0, 0.55, 0.1]
    for (fake_lr, gen_lr, f), want in zip(lrs, factors, strict=True):
        assert f == pytest.approx(want)
        assert fake_lr == pytest.approx(1e-3 * want) and gen_lr == pytest.approx(2e-3 * want)
    with pytest.raises(ConfigError, match="decay_frac"):
        OptimConfig(decay_frac=1.5)


def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tr = _mlp_trainer(2, rank=rank, world_size=world)
    for _ in range(2):
        tr.step()
    torch.save({k: v for k, v in tr.generator.state_dict().items()}, f"{out_dir}/gen{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    """world_size=2 with gloo all-reduce == one process accumulating the same global batch."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _mlp_trainer(2)
    for _ in range(2):
        single.step()
    for rank in range(2):
        got = torch.load(tmp_path / f"gen{rank}.pt")
        for key, value in single.generator.state_dict().items():
            assert torch.allclose(got[key], value, atol=1e-10), (rank, key)


def _nonfinite_worker(rank, world, init_file, out_dir):
    """Rank 0's teacher is NaN on every sample (its uncond pass), rank 1's is finite."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    outcome = {}
    for frac in (0.5, 0.4):  # limit 0.5 * 8 = 4 samples: 4 bad pass; 0.4 * 8 = 3.2: 4 bad abort
        tr = _mlp_trainer(
            4, rank=rank, world_size=world, train=TrainConfig(batch=8, batch_gpu=2, seed=3, max_nonfinite_frac=frac)
        )
        if rank == 0:
            tr.teacher = NaNOnLabel(tr.teacher, label=4)  # GMMCondSource(4).uncond is label 4
        try:
            m = tr.generator_phase(0)
            outcome[str(frac)] = [m["nonfinite_gen"], tr.nonfinite_total["gen"]]
        except NonFiniteError as err:
            outcome[str(frac)] = str(err)
    with open(f"{out_dir}/nonfinite{rank}.json", "w") as fh:
        json.dump(outcome, fh)
    dist.barrier()  # both ranks past their last collective before gloo tears down (else a rare abort)
    dist.destroy_process_group()


@pytest.mark.slow
def test_nonfinite_limit_is_job_wide_so_all_ranks_abort_together(tmp_path):
    """4 of the global 8 samples are bad, all on rank 0: the limit applies to the job's count."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_nonfinite_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"nonfinite{rank}.json").read_text()) for rank in range(2)]
    # the phase's metric and the running total are both the job's count (read once, summed over ranks)
    assert [g["0.5"] for g in got] == [[4, 4], [4, 4]]
    for g in got:
        assert g["0.4"].startswith("4/8 non-finite samples in the gen phase"), g


class TrigFlowGMM(nn.Module):
    """The exact mixture teacher as a TrigFlow v-prediction model: ``x_s = cos s x0 + sin s eps``,
    output ``v = cos s eps - sin s x0`` (what a TrigFlow network such as SANA-Sprint's predicts)."""

    def __init__(self, mixture):
        super().__init__()
        self.rf = GMMDenoiser(mixture)

    def forward(self, x_s, s, cond):
        a, b = torch.cos(s).view(-1, 1), torch.sin(s).view(-1, 1)
        x0 = self.rf.x0(x_s / (a + b), (b / (a + b)).view(-1), cond["label"])
        eps = (x_s - a * x0) / b
        return a * eps - b * x0


def test_a_trigflow_teacher_distils_exactly_like_its_rectified_flow_form():
    """sidflow.core.paths as a teacher adapter: the same mixture seen as a TrigFlow v-model through
    DiffusionDenoiser gives the generator the gradients of the rectified-flow teacher."""
    from sidflow.core.paths import DiffusionDenoiser, TrigFlowPath

    rf, trig = _mlp_trainer(4), _mlp_trainer(4)
    trig.teacher = DiffusionDenoiser(TrigFlowGMM(make_mixture("2d")), TrigFlowPath(), "v")
    for it in (0, 1):
        generator_gradients(rf, it)
        generator_gradients(trig, it)
        for a, b in zip(rf.gen_params, trig.gen_params, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-9)
    assert any(p.grad.abs().max() > 1e-6 for p in rf.gen_params)
