"""Cost of one real SiD iteration against the bare forward/backward passes it is made of (issue 4).

One iteration with ``k`` generator steps and CFG scale ``kappa`` (``p = 1`` pass if kappa == 1, else 2
passes on a batched [uncond; cond] input) needs, per sample:

* fake phase: ``k`` generator forwards without grad + the fake score's forward/backward (``p``);
* generator phase: ``k - 1`` generator forwards without grad, one generator forward/backward, and a
  forward/backward *through the inputs* of the frozen teacher (``p``) and of the fake score (``p``).

The benchmark times ``SiDTrainer.fake_phase`` and ``generator_phase`` for each ``k`` (choosing
iterations whose keyed ``k`` is the one wanted), times the bare passes at the same batch, and prints
the measured cost against the sum of the bare passes (overhead = measured / bare sum). Ratios within
one run; the machine is noisy.

    python benchmarks/iteration.py [--teacher bundled] [--batch 32] [--kappa 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sidflow.config import apply_overrides
from sidflow.data.prompts import PromptSource
from sidflow.run.build import load_run_teacher
from sidflow.run.presets import get_preset
from sidflow.run.registry import resolve_prompts
from sidflow.trainer import SiDTrainer


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bare_passes(net, x, t, cond, repeats: int) -> dict[str, float]:
    """Median seconds of: forward (no grad), forward+backward into parameters, and into inputs only."""

    def fwd():
        with torch.no_grad():
            net.velocity(x, t, cond)

    def fwd_bwd_params():
        net.requires_grad_(True)
        net.velocity(x, t, cond).square().sum().backward()
        net.zero_grad(set_to_none=True)

    def fwd_bwd_input():
        net.requires_grad_(False)
        xi = x.clone().requires_grad_(True)
        net.velocity(xi, t, cond).square().sum().backward()

    return {
        "fwd": _time(fwd, repeats),
        "fwd_bwd_params": _time(fwd_bwd_params, repeats),
        "fwd_bwd_input": _time(fwd_bwd_input, repeats),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--kappa", type=float, default=1.0, help="kappa1 = kappa2 = kappa4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = apply_overrides(
        get_preset(args.preset),
        [
            f"train.batch={args.batch}",
            f"train.batch_gpu={args.batch}",
            f"guidance.kappa1={args.kappa}",
            f"guidance.kappa2={args.kappa}",
            f"guidance.kappa4={args.kappa}",
            *args.overrides,
        ],
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_run_teacher(cfg, device)
    shape = teacher.latent_shape(cfg.data.resolution)
    source = PromptSource(resolve_prompts(cfg.data.prompts), teacher)
    source.precompute()
    nets = teacher.make_denoisers()
    trainer = SiDTrainer(*nets, source, shape, cfg, device)
    passes = 1 if args.kappa in (0.0, 1.0) else 2
    x = torch.randn(args.batch * passes, *shape, device=device)
    t = torch.rand(args.batch * passes, device=device)
    cond = source.sample(seed=0, iteration=0, stream="bench", indices=range(args.batch * passes))
    bare = bare_passes(nets[2], x[: args.batch], t[: args.batch], cond.index(slice(0, args.batch)), args.repeats)
    bare_cfg = bare_passes(nets[1], x, t, cond, args.repeats) if passes == 2 else bare
    n_params = sum(p.numel() for p in nets[0].parameters())
    print(
        f"teacher {cfg.teacher.path}: {n_params / 1e6:.2f} M transformer parameters, latents {shape}, "
        f"batch {args.batch}, kappa {args.kappa:g} ({passes} pass{'es' if passes > 1 else ''}), "
        f"{torch.get_num_threads()} threads, {device}"
    )
    print(
        f"bare passes at batch {args.batch}: forward {bare['fwd'] * 1e3:.1f} ms, forward+backward "
        f"(params) {bare['fwd_bwd_params'] * 1e3:.1f} ms, forward+backward (inputs) "
        f"{bare['fwd_bwd_input'] * 1e3:.1f} ms"
    )
    print(
        f"\n{'k':>2} {'fake phase s':>13} {'gen phase s':>12} {'iteration s':>12} {'bare sum s':>11} "
        f"{'overhead':>9} {'img/s':>7}"
    )
    for k in range(1, cfg.generator.num_steps + 1):
        iteration = next(i for i in range(10_000) if trainer.k_for(i) == k)
        fake_s = _time(lambda it=iteration: trainer.fake_phase(it), args.repeats)
        # both phases include their Adam step (and the generator its EMA), as in training
        gen_s = _time(lambda it=iteration: trainer.generator_phase(it), args.repeats)
        fake_bare = k * bare["fwd"] + bare_cfg["fwd_bwd_params"]
        gen_bare = (k - 1) * bare["fwd"] + bare["fwd_bwd_params"] + 2 * bare_cfg["fwd_bwd_input"]
        total = fake_s + gen_s
        print(
            f"{k:>2} {fake_s:>13.3f} {gen_s:>12.3f} {total:>12.3f} {fake_bare + gen_bare:>11.3f} "
            f"{total / (fake_bare + gen_bare):>8.2f}x {args.batch / total:>7.1f}"
        )


if __name__ == "__main__":
    main()
