"""The two-phase SiD training loop (spec section 6), generic over any Denoiser.

Score identity Distillation (Zhou et al. 2024), few-step flow-matching form (arXiv 2509.25127,
Algorithm 1). One iteration with global batch ``B``, micro-batch ``b`` and ``R = B / (world b)``
accumulation rounds per rank, in the paper's order (:meth:`SiDTrainer.step`):

0. draw: the step count ``k`` (one per iteration, shared by both phases and all ranks); then per
   micro-batch the prompts, ``z``, ``eps``, ``t`` and the fresh step noise, each keyed by (seed,
   iteration, phase, global sample index) (:meth:`SiDTrainer.draw`, :mod:`sidflow.core.rng`);
1. fake score phi (spec 4): ``x_g`` from the generator under ``no_grad``; regress the kappa1-guided
   velocity of phi at ``x_t = (1 - t) x_g + t eps`` onto ``eps - x_g`` (SiDA adds its discriminator
   loss, spec 7.2); one Adam step;
2. generator theta (spec 5): ``x_g`` with gradient through the last step; the kappa4-guided teacher
   and the kappa2/3-guided fake x0-predictions at a fresh ``x_t`` (NOT detached) give the SiD loss
   (SiDA mixes in its adversarial loss, spec 7.3); one Adam step, then the generator EMA.

Each loss is ``ls`` (``lsg``) times the per-sample sums over one round divided by ``B / world``, so R
rounds of ``b`` produce exactly the gradients of one round of ``R b``; results do not depend on ``b``
or on the number of ranks. Gradients are averaged across ranks (:mod:`sidflow.collectives`), then
``nan_to_num``'d (nan -> 0, +-inf -> +-1e5) and optionally clipped by value before Adam
``betas=(0, 0.999)`` steps. Non-finite samples are excluded from the sums and counted; the count
stays on the device until the one check per phase, which reads it (summed over ranks) and past
``train.max_nonfinite_frac`` of the global batch raises NonFiniteError on every rank. Losses are
returned as 0-dim device tensors: the caller reads them on the host only at its log points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast, overload

import torch
from torch import Tensor, nn

from sidflow.collectives import all_reduce_mean_, is_distributed, reshard, set_gradient_sync, sum_over_ranks
from sidflow.config import SiDConfig
from sidflow.core import rng
from sidflow.core.denoiser import Cond, CondSource, Denoiser, FeatureDenoiser, RealSource
from sidflow.core.flow import add_noise, t_from_variate, x0_from_velocity
from sidflow.core.generator import generator_step_times, sample_generator
from sidflow.core.guidance import (
    cfg,
    cond_uncond_velocity,
    guided_velocity,
    guided_velocity_and_features,
    guided_x0,
    with_embedded_guidance,
)
from sidflow.core.losses import (
    discriminator_loss,
    fake_score_loss,
    finite_mask,
    generator_adv_loss,
    loss_weight,
    masked_sum,
    sid_generator_loss,
)
from sidflow.core.schedule import ema_beta, lr_factor
from sidflow.errors import CheckpointError, ConfigError, NonFiniteError
from sidflow.optim import make_optimizer, resolve_precision

__all__ = ["SiDTrainer", "Draws", "generator_state_dict"]

INF_CLAMP = 1e5


@dataclass
class Draws:
    """Everything random in one micro-batch of one phase (all keyed per global sample index)."""

    indices: list[int]
    cond: Cond
    uncond: Cond
    z: Tensor
    fresh: Tensor | None
    eps: Tensor
    t: Tensor


class SiDTrainer:
    """Two-phase SiD trainer on already-built networks (never copied).

    Args:
        teacher: frozen teacher psi (set to eval, requires_grad False here).
        fake: fake score phi (trainable), usually initialised as a copy of the teacher.
        generator: generator theta (trainable), usually initialised as a copy of the teacher.
        conds: keyed conditioning source (prompts or class labels).
        latent_shape: per-sample latent shape, e.g. ``(16, 64, 64)``.
        config: the run configuration.
        device: where draws and conditioning go (networks must already be there).
        real_source: real latents + cond for SiDA (``gan.mode="sida"``).
        rank, world_size: this process's rank and the number of ranks.

    The draws ``z``, ``eps`` and ``t`` are float32, or float64 when the generator's weights are
    (exactness tests), matching the denoisers' own output precision.
    """

    def __init__(
        self,
        teacher: Denoiser,
        fake: Denoiser,
        generator: Denoiser,
        conds: CondSource,
        latent_shape: Sequence[int],
        config: SiDConfig,
        device: torch.device | str = "cpu",
        *,
        real_source: RealSource | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        tc = config.train
        if tc.batch % (world_size * tc.batch_gpu):
            raise ConfigError(
                f"train.batch={tc.batch} must be a multiple of world_size*train.batch_gpu={world_size * tc.batch_gpu}"
            )
        if config.gan.mode == "sida" and real_source is None:
            raise ConfigError("gan.mode=sida needs a real_source of real latents; or set gan.mode=off")
        if config.gan.mode == "sida" and not isinstance(fake, FeatureDenoiser):
            raise ConfigError(f"gan.mode=sida needs discriminator features, which {type(fake).__name__} lacks")
        self.teacher, self.fake, self.generator = teacher, fake, generator
        self.conds, self.real_source, self.config = conds, real_source, config
        self.latent_shape, self.device = tuple(latent_shape), torch.device(device)
        self.rank, self.world_size = rank, world_size
        first = next(iter(generator.parameters()))
        self.dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.batch_rank = tc.batch // world_size  # spec's batch_gpu_total
        self.rounds = self.batch_rank // tc.batch_gpu  # R
        self.latent_numel = math.prod(self.latent_shape)
        self.step_times = generator_step_times(
            config.generator.num_steps, config.generator.t_init, config.generator.shift
        )
        # Trainable sets are fixed here, excluding any weight shared with the teacher (adapter views),
        # so switching requires_grad per phase never unfreezes the teacher.
        teacher_ids = {id(p) for p in teacher.parameters()}
        self.fake_params = [p for p in fake.parameters() if id(p) not in teacher_ids and p.requires_grad]
        self.gen_params = [p for p in generator.parameters() if id(p) not in teacher_ids and p.requires_grad]
        if not self.fake_params or not self.gen_params:
            raise ConfigError("fake and generator need trainable parameters not shared with the teacher")
        cast(nn.Module, teacher).eval()  # denoisers are nn.Modules (see Denoiser)
        teacher.requires_grad_(False)
        oc = config.optim
        self.precision = resolve_precision(tc.precision, self.device)
        pure = self.precision == "pure_bf16"
        eps = oc.eps if oc.eps is not None else (1e-4 if pure else 1e-8)  # the reference's pure-bf16 eps
        self.grad_clip = oc.grad_clip if oc.grad_clip is not None else (1.0 if pure else None)
        kw: dict[str, Any] = {"betas": oc.betas, "eps": eps, "precision": self.precision, "seed": tc.seed}
        self.opt_fake = make_optimizer(self.fake_params, lr=oc.lr, stream="round/fake", **kw)
        self.opt_gen = make_optimizer(self.gen_params, lr=oc.glr, stream="round/gen", **kw)
        self.iteration, self.images_seen = 0, 0
        self.nonfinite_total = {"fake": 0, "gen": 0}
        self.ema: dict[str, Tensor] | None = None
        if tc.ema_halflife_kimg > 0:
            self.ema = {n: p.detach().clone() for n, p in cast(nn.Module, generator).named_parameters()}

    # ---- one iteration (Algorithm 1) --------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """One full iteration: fake-score phase, then generator phase.

        Returns:
            ``{"iteration", "k", "loss_fake", "loss_gen", "nonfinite_fake", "nonfinite_gen",
            "gen_updated", "images_seen"}`` (+ ``"lr_factor"``); losses are 0-dim device tensors
            (no host sync), non-finite counts are job-wide ints.
        """
        metrics: dict[str, Any] = {"iteration": self.iteration}
        if self.config.optim.decay_frac > 0:
            metrics["lr_factor"] = self._set_learning_rates()
        metrics.update(self.fake_phase(self.iteration))
        metrics.update(self.generator_phase(self.iteration))
        self.iteration += 1
        self.images_seen += self.config.train.batch
        metrics["images_seen"] = self.images_seen
        return metrics

    # ---- draws ------------------------------------------------------------------------------
    def k_for(self, iteration: int) -> int:
        """The step count of ``iteration``, shared by both phases and all ranks: uniform on 1..K
        (spec 3.3) unless ``generator.k_weights`` (and ``k_weights_end``, a linear move of the odds
        over the run) set other odds."""
        gc, seed = self.config.generator, self.config.train.seed
        total = max(self.config.train.num_steps() - 1, 1)
        odds = gc.k_odds(iteration / total)
        if odds is None:
            return rng.randint_keyed(1, gc.num_steps, seed=seed, iteration=iteration, stream="k")
        return 1 + rng.choice_keyed(odds, seed=seed, iteration=iteration, stream="k")

    def sample_indices(self, round_idx: int) -> list[int]:
        """Global sample indices of this rank's round: ``rank * B/world + round * b + j``."""
        b = self.config.train.batch_gpu
        start = self.rank * self.batch_rank + round_idx * b
        return list(range(start, start + b))

    def draw(self, phase: str, iteration: int, round_idx: int) -> Draws:
        """All random inputs of one micro-batch of ``phase`` ("fake" or "gen").

        Sample ``i`` draws ``z``, ``eps``, the time variate and the fresh step noise, in that order,
        from one generator keyed by ``(seed, iteration, phase, i)`` (one generator per sample instead
        of one per quantity: seeding dominates the cost of small latents). This is sidflow's one
        keyed draw of the SiD time ``t`` (:func:`sidflow.core.flow.t_from_variate`).
        """
        idx, seed = self.sample_indices(round_idx), self.config.train.seed
        lc, gc = self.config.loss, self.config.generator
        cond = self._to_device(self.conds.sample(seed=seed, iteration=iteration, stream=phase, indices=idx))
        need_fresh = gc.noise_type == "fresh" and gc.num_steps > 1
        shape, dt = self.latent_shape, self.dtype
        z, eps, u, fresh = [], [], [], []
        for i in idx:
            g = rng.keyed_generator(seed, iteration, phase, i)
            z.append(torch.randn(shape, generator=g, dtype=dt))
            eps.append(torch.randn(shape, generator=g, dtype=dt))
            u.append(
                torch.randn((), generator=g, dtype=torch.float64)
                if lc.t_sampling == "logit_normal"
                else torch.rand((), generator=g, dtype=torch.float64)
            )
            if need_fresh:
                fresh.append(torch.randn((gc.num_steps - 1, *shape), generator=g, dtype=dt))
        t = t_from_variate(
            torch.stack(u), kind=lc.t_sampling, mean=lc.t_mean, std=lc.t_std, t_min=lc.t_min, t_max=lc.t_max
        )
        return Draws(
            indices=idx,
            cond=cond,
            uncond=self._to_device(self.conds.uncond(len(idx))),
            z=self._to_device(torch.stack(z)),
            eps=self._to_device(torch.stack(eps)),
            t=self._to_device(t.to(dt)),
            fresh=self._to_device(torch.stack(fresh, 1)) if need_fresh else None,
        )

    @overload
    def _to_device(self, x: Tensor) -> Tensor: ...
    @overload
    def _to_device(self, x: Cond) -> Cond: ...
    def _to_device(self, x: Tensor | Cond) -> Tensor | Cond:
        """Keyed draws are made on the CPU (bit-identical across machines); on CUDA they cross from
        pinned memory without blocking, so the host keeps drawing while the device computes."""
        if isinstance(x, Cond):
            return Cond({k: self._to_device(v) for k, v in x.tensors.items()}, dict(x.meta))
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    # ---- phase 1: fake score (spec 4; SiDA discriminator, spec 7.2) --------------------------
    def fake_phase(self, iteration: int) -> dict[str, Any]:
        """One Adam step on the fake score over ``R`` accumulation rounds."""
        k = self.k_for(iteration)
        # The generator stays trainable: it runs under no_grad here, and FSDP2 fixes a network's
        # gradient dtypes at its first forward from the parameters that require grad then
        # (a generator first seen frozen would hand bf16 gradients to fp32 shards under amp_bf16).
        self._set_trainable(self.fake_params, True)
        self.opt_fake.zero_grad(set_to_none=True)
        loss, nonfinite = self._accumulate(
            "fake", iteration, cast(nn.Module, self.fake), partial(self.fake_loss, k=k, iteration=iteration)
        )
        self._finish_grads(self.fake_params)
        self.opt_fake.step()
        self.opt_fake.zero_grad(set_to_none=True)
        self._set_trainable(self.fake_params, False)
        return {"loss_fake": loss, "nonfinite_fake": nonfinite, "k": k}

    def fake_loss(self, d: Draws, k: int, iteration: int) -> tuple[Tensor, Tensor]:
        """Per-sample fake-score loss ``[B]`` and its finite mask ``[B]`` (+ SiDA's D loss)."""
        with torch.no_grad():
            x_g = self._generate(d, k, grad_last=False)
        x_t = add_noise(x_g, d.eps, d.t)
        cond, uncond = self._critic_conds(d)
        kappa1 = self.config.guidance.kappa1
        if self.config.gan.mode == "sida":
            return self._sida_fake_loss(d, x_g, x_t, cond, uncond, iteration)
        v = guided_velocity(self.fake, x_t, d.t, cond, uncond, kappa1)
        return self.config.loss.ls * fake_score_loss(v, x_g, d.eps), finite_mask(x_g, v)

    def _sida_fake_loss(
        self, d: Draws, x_g: Tensor, x_t: Tensor, cond: Cond, uncond: Cond, iteration: int
    ) -> tuple[Tensor, Tensor]:
        """SiDA phase 1 (spec 7.2): the fake-score loss plus the discriminator loss on its features,
        fake = generator samples, real = real latents noised with the same ``t`` (and ``eps`` when
        the shapes agree)."""
        fake = self.fake
        assert isinstance(fake, FeatureDenoiser) and self.real_source is not None  # checked in __init__
        v, feats_fake = guided_velocity_and_features(fake, x_t, d.t, cond, uncond, self.config.guidance.kappa1)
        per_sample = self.config.loss.ls * fake_score_loss(v, x_g, d.eps)
        seed = self.config.train.seed
        x_real, real_cond = self.real_source.sample(seed=seed, iteration=iteration, stream="real", indices=d.indices)
        x_real = x_real.to(self.device)
        eps = d.eps
        if x_real.shape != d.eps.shape:
            eps = rng.randn_per_sample(
                x_real.shape[1:],
                seed=seed,
                iteration=iteration,
                stream="real/eps",
                indices=d.indices,
                device=self.device,
            )
        real_cond = with_embedded_guidance(real_cond.to(self.device), self.config.guidance.embedded_teacher)
        _, feats_real = fake.velocity_and_features(add_noise(x_real, eps, d.t), d.t, real_cond)
        d_loss = self.config.gan.lsd * discriminator_loss(feats_real, feats_fake, self.latent_numel)
        return per_sample + d_loss, finite_mask(x_g, v) & finite_mask(feats_real, feats_fake)

    # ---- phase 2: generator (spec 5; SiDA adversarial term, spec 7.3) -----------------------
    def generator_phase(self, iteration: int) -> dict[str, Any]:
        """SiD loss over ``R`` rounds, one Adam step and the EMA update (none in SiDA's warm-up)."""
        gan_phase = self._gan_phase()
        if gan_phase == "warmup":
            return {"loss_gen": torch.full((), float("nan")), "nonfinite_gen": 0, "gen_updated": 0}
        k = self.k_for(iteration)
        self._set_trainable(self.fake_params, False)
        self._set_trainable(self.gen_params, True)
        self.opt_gen.zero_grad(set_to_none=True)
        loss, nonfinite = self._accumulate(
            "gen", iteration, cast(nn.Module, self.generator), partial(self.generator_loss, k=k, gan_phase=gan_phase)
        )
        self._finish_grads(self.gen_params)
        self.opt_gen.step()
        self.opt_gen.zero_grad(set_to_none=True)
        self._update_ema()
        return {"loss_gen": loss, "nonfinite_gen": nonfinite, "k": k, "gen_updated": 1}

    def generator_loss(self, d: Draws, k: int, gan_phase: str = "sid") -> tuple[Tensor, Tensor]:
        """Per-sample generator loss ``[B]`` and its finite mask ``[B]`` (``gan_phase="mix"``:
        SiDA's mixture of the SiD and the adversarial loss)."""
        lc = self.config.loss
        x_g = self._generate(d, k, grad_last=True)
        x_t = add_noise(x_g, d.eps, d.t)  # NOT detached: gradient flows into both predictions' inputs
        cond, uncond = self._critic_conds(d)
        x0_teacher = guided_x0(self.teacher, x_t, d.t, cond, uncond, self.config.guidance.kappa4)
        x0_fake, x0_fake3, feats = self._fake_x0(x_t, d.t, cond, uncond, features=gan_phase == "mix")
        per_sample = lc.lsg * sid_generator_loss(
            x_g, x0_teacher, x0_fake, d.t, lc.alpha_for(k), lc.weighting, x0_fake_second=x0_fake3
        )
        mask = finite_mask(x_g, x0_teacher, x0_fake)
        if gan_phase != "mix":
            return per_sample, mask
        assert feats is not None
        w = loss_weight(lc.weighting, d.t, x_g, x0_teacher)
        adv = self.config.gan.lsg_gan * generator_adv_loss(feats, w, self.latent_numel)
        mix = self.config.gan.mix_for(k, self.images_seen)
        return (1 - mix) * per_sample + mix * adv, mask & finite_mask(feats)

    def _fake_x0(
        self, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, features: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Fake x0 at kappa2, at kappa3 (None when equal) and the conditional features (None unless
        ``features``), all from one pass."""
        g = self.config.guidance
        feats: Tensor | None
        if g.kappa3_value == g.kappa2:
            if features:
                assert isinstance(self.fake, FeatureDenoiser)
                v, feats = guided_velocity_and_features(self.fake, x_t, t, cond, uncond, g.kappa2)
                return x0_from_velocity(x_t, v, t), None, feats
            return x0_from_velocity(x_t, guided_velocity(self.fake, x_t, t, cond, uncond, g.kappa2), t), None, None
        v_u, v_c, feats = cond_uncond_velocity(self.fake, x_t, t, cond, uncond, features=features)
        return (
            x0_from_velocity(x_t, cfg(v_u, v_c, g.kappa2), t),
            x0_from_velocity(x_t, cfg(v_u, v_c, g.kappa3_value), t),
            feats,
        )

    # ---- shared pieces ----------------------------------------------------------------------
    def _accumulate(
        self, phase: str, iteration: int, network: nn.Module, per_sample_loss: Callable[[Draws], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, int]:
        """``R`` rounds of draw -> per-sample loss -> backward of its masked sum over ``B / world``,
        then the phase's non-finite check. Returns the phase's loss (a device tensor) and its job-wide
        non-finite count."""
        loss = torch.zeros((), device=self.device)
        bad = torch.zeros((), dtype=torch.long, device=self.device)
        every_round = self.config.train.accumulate == "sharded"
        for r in range(self.rounds):  # FSDP2: reduce-scatter every round, or only the last (spec 16, no_sync)
            set_gradient_sync(network, every_round or r == self.rounds - 1)
            per_sample, mask = per_sample_loss(self.draw(phase, iteration, r))
            total, n_bad = masked_sum(per_sample, mask)
            value = total / self.batch_rank
            value.backward()
            loss, bad = loss + value.detach(), bad + n_bad
        return loss, self._check_nonfinite(phase, bad)

    def _generate(self, d: Draws, k: int, grad_last: bool) -> Tensor:
        cond = with_embedded_guidance(d.cond, self.config.guidance.embedded_generator)
        gc = self.config.generator
        return sample_generator(
            self.generator,
            d.z,
            cond,
            k=k,
            step_times=self.step_times,
            noise_type=gc.noise_type,
            fresh_noise=d.fresh,
            grad_last=grad_last,
        )

    def _critic_conds(self, d: Draws) -> tuple[Cond, Cond]:
        value = self.config.guidance.embedded_teacher
        return with_embedded_guidance(d.cond, value), with_embedded_guidance(d.uncond, value)

    def _gan_phase(self) -> str:
        """ "off", "warmup" (no G update), "sid" (G: SiD only) or "mix" (G: SiD + adversarial)."""
        g = self.config.gan
        if g.mode == "off":
            return "off"
        if self.images_seen <= g.warmup_kimg * 1000:
            return "warmup"
        return "mix" if self.images_seen > g.mix_kimg * 1000 else "sid"

    def _set_trainable(self, params: list[nn.Parameter], flag: bool) -> None:
        for p in params:
            p.requires_grad_(flag)
        # FSDP2 without reshard-after-forward: weights gathered in the other phase carry the old flag
        reshard(cast(nn.Module, self.fake), cast(nn.Module, self.generator))

    def _finish_grads(self, trainable: list[nn.Parameter]) -> None:
        if self.world_size > 1 and is_distributed():
            for p in trainable:  # every rank reduces the same list, so a missing grad counts as zero
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            # average (each rank's loss is divided by its own B/world); coalesced, and a no-op on
            # FSDP2-sharded (DTensor) grads, which FSDP has already reduce-scattered and averaged
            all_reduce_mean_(trainable)
        params = [p for p in trainable if p.grad is not None]
        for p in params:
            assert p.grad is not None
            torch.nan_to_num_(p.grad, nan=0.0, posinf=INF_CLAMP, neginf=-INF_CLAMP)
        if self.grad_clip:  # None or 0: off
            torch.nn.utils.clip_grad_value_(params, self.grad_clip)

    def _check_nonfinite(self, phase: str, bad: Tensor) -> int:
        """The phase's one host read: ``bad`` (this rank's count) summed job-wide; every rank
        raises together past the limit. Returns the job-wide count."""
        total = int(sum_over_ranks(bad).item())  # host sync, once per phase
        self.nonfinite_total[phase] += total
        limit, batch = self.config.train.max_nonfinite_frac, self.config.train.batch
        if total > limit * batch:
            raise NonFiniteError(
                f"{total}/{batch} non-finite samples in the {phase} phase of "
                f"iteration {self.iteration} (limit {limit:.0%}); lower the learning rate "
                "or raise train.max_nonfinite_frac"
            )
        return total

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        beta = ema_beta(self.config.train.batch, self.config.train.ema_halflife_kimg)
        with torch.no_grad():
            for name, p in cast(nn.Module, self.generator).named_parameters():
                self.ema[name].lerp_(p.detach(), 1 - beta)

    def _set_learning_rates(self) -> float:
        """Apply the decay tail of ``optim`` to both optimisers for this iteration; returns the factor.

        Set from the iteration rather than kept in an LR-scheduler object, so a resumed run needs no
        scheduler state in its checkpoint.
        """
        oc = self.config.optim
        factor = lr_factor(self.iteration, self.config.train.num_steps(), oc.decay_frac, oc.decay_min)
        for opt, base in ((self.opt_fake, oc.lr), (self.opt_gen, oc.glr)):
            for group in opt.param_groups:
                group["lr"] = base * factor
        return factor

    # ---- state ------------------------------------------------------------------------------
    def _stateful(self) -> dict[str, nn.Module]:
        return {"fake": self.fake, "generator": self.generator}  # type: ignore[dict-item]

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": {flat name: Tensor}, "scalars": JSON-able dict}`` (see sidflow.run.checkpoint)."""
        tensors: dict[str, Tensor] = {}
        for name, module in self._stateful().items():
            tensors.update({f"{name}/{k}": v for k, v in module.state_dict().items()})
        if self.ema is not None:
            tensors.update({f"ema/{k}": v for k, v in self.ema.items()})
        scalars: dict[str, Any] = {
            "iteration": self.iteration,
            "images_seen": self.images_seen,
            "nonfinite_total": dict(self.nonfinite_total),
        }
        for name, opt in (("optim_fake", self.opt_fake), ("optim_gen", self.opt_gen)):
            sd = opt.state_dict()
            for pid, st in sd["state"].items():
                tensors.update({f"{name}/{pid}/{key}": val for key, val in st.items()})
            scalars[name] = {"param_groups": sd["param_groups"], "state_ids": sorted(sd["state"])}
        return {"tensors": tensors, "scalars": scalars}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly; raises CheckpointError on missing/unexpected keys or shape mismatches."""
        tensors, scalars = state["tensors"], state["scalars"]
        expected = self.state_dict()["tensors"]
        own = {k: v for k, v in expected.items() if not k.startswith("optim_")}
        theirs = {k: v for k, v in tensors.items() if not k.startswith("optim_")}
        if set(own) != set(theirs):
            diff = sorted(set(own) ^ set(theirs))[:3]
            raise CheckpointError(
                f"checkpoint does not match the networks (keys differ, e.g. {diff}); "
                "load it with the same teacher and config"
            )
        for key, val in own.items():
            if tuple(theirs[key].shape) != tuple(val.shape):
                raise CheckpointError(
                    f"checkpoint tensor {key} has shape {list(theirs[key].shape)}, "
                    f"the network has {list(val.shape)}; use the matching config"
                )
        for name, module in self._stateful().items():
            prefix = f"{name}/"
            module.load_state_dict({k[len(prefix) :]: v for k, v in theirs.items() if k.startswith(prefix)})
        if self.ema is not None:
            self.ema = {k: theirs[f"ema/{k}"].clone() for k in self.ema}
        for name, opt in (("optim_fake", self.opt_fake), ("optim_gen", self.opt_gen)):
            groups = [dict(g, betas=tuple(g["betas"])) for g in scalars[name]["param_groups"]]
            state_t: dict[int, dict[str, Tensor]] = {}
            for pid in scalars[name]["state_ids"]:
                prefix = f"{name}/{pid}/"
                state_t[int(pid)] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            opt.load_state_dict({"state": state_t, "param_groups": groups})
        self.iteration, self.images_seen = int(scalars["iteration"]), int(scalars["images_seen"])
        self.nonfinite_total = dict(scalars["nonfinite_total"])


def generator_state_dict(trainer: SiDTrainer, *, ema: bool = True) -> dict[str, Tensor]:
    """The generator's state dict, with EMA parameters substituted when EMA is on and ``ema``."""
    state = dict(trainer.generator.state_dict())  # type: ignore[attr-defined]
    if ema and trainer.ema is not None:
        state.update(trainer.ema)
    return {k: v.detach().clone() for k, v in state.items()}
