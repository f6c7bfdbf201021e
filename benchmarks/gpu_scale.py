"""SiD at true size on one GPU: images/s, peak memory and model FLOPs utilisation (issue 11).

The true-size SD3-Medium transformer (2.03 B parameters, built from the shipped public config with
random weights: no download), its three networks built by sidflow's own ``three_networks`` (frozen
teacher, fake score, generator; gradient checkpointing on all three) and trained by
``SiDTrainer`` exactly as a run does, with random prompt embeddings of the real shapes. Every
iteration trains the worst case k = K = 4 generator steps, with CFG on the teacher (kappa4) and the
fake score as configured. Prints one JSON line:

* ``images_per_s``: generator images per second over the timed iterations (after 2 warm-up ones);
* ``max_memory_allocated_gib``: ``torch.cuda.max_memory_allocated`` over the timed iterations;
* ``mfu``: FLOPs of one iteration, counted by ``torch.utils.flop_counter.FlopCounterMode`` (the
  recomputation of checkpointing included), times iterations per second, over ``--peak-tflops``
  (default 989: H100/H200 dense bf16);
* ``sidflow_plan_gib``: what ``sidflow plan`` predicts for the same iteration (its tracked tensors,
  one GPU, the same precision, batch, checkpointing and k = K; computed on the host first, ~1 min),
  beside ``plan_ratio`` = measured / predicted. The benchmark has no VAE or text encoder on the GPU,
  so the plan's fixed terms (VAE, text encoders, overhead) are left out of the comparison.

    python benchmarks/gpu_scale.py       # SD3-Medium, 1024 px, batch 8 (the plan's 1-GPU fit), amp_bf16
    python benchmarks/gpu_scale.py --tiny --device cpu --precision fp32 --iterations 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sidflow.config import GeneratorConfig, GuidanceConfig, OptimConfig, SiDConfig, TrainConfig
from sidflow.core import rng
from sidflow.core.denoiser import Cond
from sidflow.teachers.base import three_networks
from sidflow.teachers.configs import shipped_config
from sidflow.teachers.families import FAMILIES
from sidflow.teachers.sd3 import SD3Denoiser
from sidflow.trainer import SiDTrainer


class RandomPrompts:
    """Keyed random SD3 prompt embeddings of the real shapes (a CondSource)."""

    def __init__(self, tokens: int, width: int, pooled: int) -> None:
        self.tokens, self.width, self.pooled = tokens, width, pooled

    def sample(self, *, seed: int, iteration: int, stream: str, indices: Sequence[int]) -> Cond:
        embeds = rng.randn_per_sample(
            (self.tokens, self.width), seed=seed, iteration=iteration, stream=stream, indices=indices
        )
        pooled = rng.randn_per_sample(
            (self.pooled,), seed=seed, iteration=iteration, stream=stream + "/pooled", indices=indices
        )
        return Cond({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})

    def uncond(self, batch_size: int) -> Cond:
        return Cond(
            {
                "prompt_embeds": torch.zeros(batch_size, self.tokens, self.width),
                "pooled_prompt_embeds": torch.zeros(batch_size, self.pooled),
            }
        )


def _transformer_config(tiny: bool) -> dict:
    if tiny:
        from sidflow.testing import tiny_pipeline

        folder = tiny_pipeline("sd3", Path(tempfile.mkdtemp(prefix="gpu-scale-")))
        return json.loads((folder / "transformer" / "config.json").read_text())
    spec = shipped_config("sd3-medium")
    assert spec is not None
    return spec["components"]["transformer"][2]


def _plan_gib(args) -> float:
    """``sidflow plan``'s tracked peak (GiB) for this benchmark's iteration on one GPU."""
    from sidflow.config import DataConfig, TeacherConfig
    from sidflow.run.plan import plan

    if args.tiny:
        from sidflow.testing import tiny_pipeline

        path = str(tiny_pipeline("sd3", Path(tempfile.mkdtemp(prefix="gpu-scale-plan-"))))
    else:
        path = "stabilityai/stable-diffusion-3-medium-diffusers"  # the shipped config: no download
    config = SiDConfig(
        teacher=TeacherConfig(path=path, time_scale=1000.0, gradient_checkpointing="on"),
        generator=GeneratorConfig(num_steps=4),
        guidance=GuidanceConfig(kappa1=4.5, kappa2=4.5, kappa4=4.5),
        train=TrainConfig(batch=args.batch_gpu, batch_gpu=args.batch_gpu, precision=args.precision),
        data=DataConfig(resolution=args.resolution),
    )
    return float(plan(config, world_size=1)["tracked_peak_gib"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-gpu", type=int, default=8)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--precision", default="amp_bf16", choices=["fp32", "amp_bf16", "pure_bf16"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    p.add_argument("--tiny", action="store_true", help="the tiny SD3 test architecture (smoke test)")
    p.add_argument("--no-plan", action="store_true", help="skip the sidflow plan prediction")
    args = p.parse_args()
    planned = None if args.no_plan else _plan_gib(args)
    from diffusers import SD3Transformer2DModel

    device = torch.device(args.device)
    cfg = {k: v for k, v in _transformer_config(args.tiny).items() if not k.startswith("_")}
    dtype = torch.bfloat16 if args.precision == "pure_bf16" else torch.float32
    with torch.device(device):
        transformer = SD3Transformer2DModel.from_config(cfg)
    if dtype != torch.float32:
        transformer = transformer.to(dtype)
    params = sum(t.numel() for t in transformer.parameters())
    networks = three_networks(
        SD3Denoiser(transformer, FAMILIES["sd3"].time_scale), gradient_checkpointing=True, precision=args.precision
    )
    vae_factor = 8 if not args.tiny else 2
    latent = (int(cfg["in_channels"]), args.resolution // vae_factor, args.resolution // vae_factor)
    prompts = RandomPrompts(
        77 + FAMILIES["sd3"].max_sequence_length, int(cfg["joint_attention_dim"]), int(cfg["pooled_projection_dim"])
    )
    config = SiDConfig(
        generator=GeneratorConfig(num_steps=4, k_weights=(0.0, 0.0, 0.0, 1.0)),  # always k = K (worst case)
        guidance=GuidanceConfig(kappa1=4.5, kappa2=4.5, kappa4=4.5),
        optim=OptimConfig(lr=5e-6, glr=5e-6),
        train=TrainConfig(batch=args.batch_gpu, batch_gpu=args.batch_gpu, precision=args.precision),
    )
    trainer = SiDTrainer(*networks, prompts, latent, config, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up (allocator, kernels)
        trainer.step()
    sync()
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step()
    flops = counter.get_total_flops()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iterations):
        metrics = trainer.step()
    loss = float(metrics["loss_gen"])  # host read: waits for the device
    sync()
    seconds = time.perf_counter() - start
    per_iteration = seconds / args.iterations
    print(
        json.dumps(
            {
                "architecture": "tiny sd3" if args.tiny else "SD3-Medium",
                "transformer_params": params,
                "resolution": args.resolution,
                "batch_gpu": args.batch_gpu,
                "precision": args.precision,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                "seconds_per_iteration": per_iteration,
                "images_per_s": args.batch_gpu / per_iteration,
                "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else None,
                "tflops_per_iteration": flops / 1e12,
                "mfu": flops / per_iteration / (args.peak_tflops * 1e12),
                "sidflow_plan_gib": planned,
                "plan_ratio": torch.cuda.max_memory_allocated(device) / 2**30 / planned
                if device.type == "cuda" and planned
                else None,
                "loss_gen": loss,
            }
        )
    )


if __name__ == "__main__":
    main()
