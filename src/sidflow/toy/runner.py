"""The analytic distillation run: SiD on a Gaussian-mixture teacher, end to end (issue 2, item 2).

1. the exact teacher ``E[x0 | x_t, c]`` (:mod:`sidflow.toy.gmm`);
2. an MLP fitted to it, copied into the fake score and the generator (as DiT copies would be);
3. :class:`~sidflow.trainer.SiDTrainer` with the run's config, logging both losses;
4. the energy distance of generator samples (EMA weights when EMA is on) to fresh mixture samples, on
   fixed evaluation seeds disjoint from training, against the exact teacher's Euler sampler with the
   same ``z`` and labels; the share of each component and of the prompted class.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from sidflow.config import SiDConfig, to_dict
from sidflow.core.denoiser import Cond, Denoiser
from sidflow.core.generator import generate, generator_step_times
from sidflow.core.sampling import euler_sample
from sidflow.run.checkpoint import save_checkpoint
from sidflow.toy.energy import energy_distance
from sidflow.toy.gmm import GaussianMixture, GMMCondSource, GMMDenoiser, make_mixture
from sidflow.toy.mlp import MLPDenoiser, fit_to_teacher
from sidflow.trainer import SiDTrainer, generator_state_dict

__all__ = ["GMMEvaluator", "build_gmm_trainer", "run_gmm", "format_table", "TEACHER_STEPS", "FIT_STEPS"]

TEACHER_STEPS = (1, 2, 4, 8, 16, 32)
FIT_STEPS, FIT_BATCH, HIDDEN, DEPTH = 800, 256, 256, 3
# Hyper-parameters were tuned with evaluation seed 2**31 - 7; the reported numbers use this fresh one.
EVAL_SEED = 20261126


@dataclass
class GMMEvaluator:
    """Fixed evaluation set: ``n`` labels, initial noises and fresh reference samples."""

    mixture: GaussianMixture
    n: int = 4000
    seed: int = EVAL_SEED

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        shape, C = self.mixture.shape, self.mixture.num_classes
        self.labels = torch.randint(C, (self.n,), generator=g)
        self.z = torch.randn(self.n, *shape, generator=g)
        self.fresh = torch.randn(8, self.n, *shape, generator=g)
        self.reference, _ = self.mixture.sample(torch.randint(C, (self.n,), generator=g), g)

    def score(self, x: torch.Tensor) -> dict[str, float]:
        """Energy distance to the reference, min/max component share (1 = exact), prompted-class share."""
        comp = self.mixture.assign(x)
        m = self.mixture.means.shape[0]
        share = torch.bincount(comp, minlength=m).double() / self.n
        expected = self.mixture.weights(self.labels).double().mean(0)
        ratio = share / expected
        return {
            "energy_distance": energy_distance(x, self.reference),
            "component_share_min": float(ratio.min()),
            "component_share_max": float(ratio.max()),
            "prompted_class_share": float((self.mixture.owner[comp] == self.labels).double().mean()),
        }

    @torch.no_grad()
    def generator(self, net: torch.nn.Module, config: SiDConfig, k: int | None = None) -> dict[str, float]:
        gc = config.generator
        times = generator_step_times(gc.num_steps, gc.t_init, gc.shift)
        x = generate(
            cast(Denoiser, net),  # a Denoiser module (the generator's copy)
            Cond({"label": self.labels}),
            self.mixture.shape,
            steps=k or gc.num_steps,
            step_times=times,
            noise_type=gc.noise_type,
            z=self.z,
            fresh_noise=self.fresh,
        )
        return self.score(x)

    def teacher(self, teacher: GMMDenoiser, steps: int) -> dict[str, float]:
        sigmas = torch.linspace(1.0, 0.0, steps + 1)  # uniform Euler steps from noise to data
        return self.score(euler_sample(teacher, self.z, sigmas, Cond({"label": self.labels})))


@functools.lru_cache(maxsize=4)
def _fitted_mlp(kind: str, seed: int, steps: int) -> tuple[MLPDenoiser, float]:
    """The "pretrained" MLP of a mixture (cached: several runs in one process share the fit)."""
    mixture = make_mixture(kind)
    torch.manual_seed(seed)
    mlp = MLPDenoiser(mixture.shape, mixture.num_classes, hidden=HIDDEN, depth=DEPTH)
    fit_err = fit_to_teacher(mlp, GMMDenoiser(mixture), mixture, steps=steps, batch=FIT_BATCH, seed=seed)
    return mlp, fit_err


def build_gmm_trainer(config: SiDConfig, fit_steps: int = FIT_STEPS) -> tuple[SiDTrainer, GaussianMixture, float]:
    """Exact teacher, MLP fitted to it (seeded by ``train.seed``), copies as fake and generator."""
    mixture = make_mixture(config.teacher.path)
    mlp, fit_err = _fitted_mlp(config.teacher.path, config.train.seed, fit_steps)
    trainer = SiDTrainer(
        GMMDenoiser(mixture),
        copy.deepcopy(mlp),
        copy.deepcopy(mlp),
        GMMCondSource(mixture.num_classes),
        mixture.shape,
        config,
    )
    return trainer, mixture, fit_err


def run_gmm(
    config: SiDConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    eval_points: int = 8,
    eval_n: int = 4000,
    fit_steps: int = FIT_STEPS,
) -> dict[str, Any]:
    """Distil, evaluate ``eval_points`` times, checkpoint, write ``metrics.json``; returns the metrics."""
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer, mixture, fit_err = build_gmm_trainer(config, fit_steps)
    evaluator = GMMEvaluator(mixture, n=eval_n)
    eval_net = cast(torch.nn.Module, copy.deepcopy(trainer.generator))  # an MLPDenoiser
    total = config.train.num_steps()
    every = max(total // max(eval_points, 1), 1)
    history = []
    bar = tqdm(range(total), desc=f"sid {config.name}", disable=not progress, mininterval=1.0)
    for it in bar:
        m = trainer.step()
        if (it + 1) % every == 0 or it + 1 == total:
            loss_fake, loss_gen = float(m["loss_fake"]), float(m["loss_gen"])  # host read at eval points only
            bar.set_postfix(loss_fake=f"{loss_fake:.3f}", loss_gen=f"{loss_gen:.3f}", k=m["k"], refresh=False)
            eval_net.load_state_dict(generator_state_dict(trainer))
            history.append(
                {
                    "iteration": it + 1,
                    "loss_fake": loss_fake,
                    "loss_gen": loss_gen,
                    **evaluator.generator(eval_net, config),
                }
            )
        ce = config.train.ckpt_every
        if ce and (it + 1) % ce == 0 and it + 1 < total:
            save_checkpoint(run_dir, it + 1, trainer.state_dict(), to_dict(config))
    save_checkpoint(run_dir, total, trainer.state_dict(), to_dict(config))
    gmm_teacher = cast(GMMDenoiser, trainer.teacher)  # built by build_gmm_trainer
    teacher = {s: evaluator.teacher(gmm_teacher, s) for s in TEACHER_STEPS}  # same z, labels, ref
    metrics = {
        "config": config.name,
        "mixture": config.teacher.path,
        "eval_samples": eval_n,
        "mlp_fit_x0_mse": fit_err,
        "history": history,
        "final": history[-1],
        "teacher_euler": {str(s): v for s, v in teacher.items()},
        "nonfinite_total": trainer.nonfinite_total,
        "seconds": time.perf_counter() - start,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """Plain-text table: energy distance against iteration, then the teacher's Euler sampler."""
    lines = [f"{'sampler':<28}{'energy distance':>16}{'comp share min-max':>22}{'prompted':>10}"]
    for row in metrics["history"]:
        lines.append(
            f"{'student it ' + str(row['iteration']):<28}{row['energy_distance']:>16.5f}"
            f"{row['component_share_min']:>12.2f}-{row['component_share_max']:<9.2f}"
            f"{row['prompted_class_share']:>10.3f}"
        )
    for steps, row in metrics["teacher_euler"].items():
        lines.append(
            f"{'exact teacher Euler ' + steps:<28}{row['energy_distance']:>16.5f}"
            f"{row['component_share_min']:>12.2f}-{row['component_share_max']:<9.2f}"
            f"{row['prompted_class_share']:>10.3f}"
        )
    return "\n".join(lines)
