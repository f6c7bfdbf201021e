"""A short SiD run on a tiny local SD3 pipeline through `sidflow distill` (the diffusers example-test pattern)."""

from __future__ import annotations

import json

import pytest
import torch

from sidflow import cli
from sidflow.cli import distill
from sidflow.run.artifacts import load_run_generator, sample_run
from sidflow.testing import tiny_pipeline

pytestmark = pytest.mark.slow


def _tiny_run(tmp_path, prompts_text: str, *extra: str):
    """``(run folder, sidflow distill arguments)`` of a short run on a tiny local SD3 pipeline."""
    teacher = tiny_pipeline("sd3", tmp_path / "pipes")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompts_text)
    run = tmp_path / "run"
    args = [
        "--preset",
        "sd3-medium-4step",
        "--run-dir",
        str(run),
        f"teacher.path={teacher}",
        "teacher.time_scale=1000",
        f"data.prompts={prompts}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.resolution=32",
        "train.total_kimg=none",
        "train.ema_halflife_kimg=0.01",
        *extra,
    ]
    return run, args


def test_short_pipeline_run_writes_a_complete_run_folder(tmp_path):
    run, args = _tiny_run(
        tmp_path,
        "a red cube\na blue ball\n\na green cone\n",
        "teacher.gradient_checkpointing=off",
        "train.batch=4",
        "train.batch_gpu=2",
        "train.max_steps=3",
        "train.ckpt_every=2",
        "eval.grid_size=3",
        "guidance.kappa1=2",
    )
    assert distill.main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iterations"] == 3 and metrics["images_seen"] == 12
    assert (run / "checkpoints" / "step-00000002").is_dir() and (run / "checkpoints" / "step-00000003").is_dir()
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["loss_fake"], r["loss_gen"]])).all() for r in rows)
    for name in ("report.md", "samples.png", "config.json", "generator_pipeline/model_index.json"):
        assert (run / name).exists(), name

    # The exported generator runs in the stock pipeline: one step from sigma 1 is x0 = z - v(z, 1),
    # exactly sidflow's 1-step student with the same initial noise.
    from diffusers import StableDiffusion3Pipeline

    config, adapter, generator, shape = load_run_generator(run, "cpu")
    pipe = StableDiffusion3Pipeline.from_pretrained(run / "generator_pipeline")
    z = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    ours = generator.velocity(z, torch.ones(1), adapter.encode_prompts(["a red cube"]))
    stock = pipe(
        "a red cube",
        sigmas=[1.0],
        guidance_scale=1.0,
        latents=z,
        height=32,
        width=32,
        output_type="latent",
        max_sequence_length=adapter.max_sequence_length,
    ).images
    torch.testing.assert_close(stock, z - ours, rtol=1e-4, atol=1e-4)

    images = sample_run(run, ["a red cube", "a blue ball"], steps=2)
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    out = tmp_path / "s.png"
    assert cli.main(["sample", str(run), "--prompt", "a red cube", "--steps", "1", "--out", str(out)]) == 0
    assert (tmp_path / "s.png").is_file()
    assert cli.main(["sample", str(tmp_path), "--prompt", "x"]) == 1  # not a run folder: one-line error
    # resuming a finished run does no more iterations and keeps the checkpoint
    assert distill.main(args) == 0
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 3


def test_short_lora_run_exports_the_adapter_and_samples(tmp_path):
    """`sidflow distill ... lora.rank=4` end to end: adapter-only checkpoints, the merged pipeline and
    the LoRA file, and `sidflow sample` from the adapter on the teacher."""
    from safetensors import safe_open

    from sidflow.run.export import LORA_DIR, LORA_FILE

    run, args = _tiny_run(
        tmp_path,
        "a red cube\na blue ball\n",
        "train.batch=2",
        "train.batch_gpu=2",
        "train.max_steps=2",
        "eval.grid_size=2",
        "lora.rank=4",
    )
    assert distill.main(args) == 0
    with safe_open(str(run / "checkpoints" / "step-00000002" / "generator.safetensors"), "pt") as f:
        assert f.keys() and all(".lora_" in k for k in f.keys())
    assert (run / "generator_pipeline" / "model_index.json").is_file()
    assert (run / LORA_DIR / LORA_FILE).is_file()
    config, adapter, generator, _ = load_run_generator(run, "cpu")
    assert config.lora.rank == 4 and generator.adapter == "generator"
    images = sample_run(run, ["a red cube"], steps=1)
    assert images.shape[0] == 1 and torch.isfinite(images).all()


@pytest.mark.parametrize("init_generator", ["ema", "raw"])
def test_init_from_starts_a_run_from_another_runs_networks(tmp_path, init_generator):
    """train.init_from: the new run's first checkpoint (0 iterations) holds the source run's fake
    score, its generator from the EMA (or raw) weights, and the EMA; counters start at 0; optimiser
    states are fresh unless train.init_optimizers=on."""
    from sidflow.run.checkpoint import latest_checkpoint, read_network

    source, args = _tiny_run(
        tmp_path, "a red cube\na blue ball\n", "train.batch=2", "train.batch_gpu=2", "train.max_steps=2"
    )
    assert distill.main(args) == 0
    start = tmp_path / "start"
    rest = [a for a in args if not a.startswith(("--run-dir", "train.max_steps")) and a != str(source)]
    overrides = [f"train.init_from={source}", f"train.init_generator={init_generator}", "train.max_steps=0"]
    assert distill.main(["--run-dir", str(start), *rest, *overrides]) == 0
    theirs, ours = latest_checkpoint(source), latest_checkpoint(start)
    assert ours is not None and ours.name == "step-00000000"
    for name in ("fake", "ema"):
        mine, want = read_network(ours, name), read_network(theirs, name)
        assert all(torch.equal(mine[k], want[k]) for k in want), name
    generator, want = (
        read_network(ours, "generator"),
        read_network(theirs, "generator" if init_generator == "raw" else "ema"),
    )
    assert all(torch.equal(generator[k], want[k]) for k in want)
    assert json.loads((start / "metrics.json").read_text())["iterations"] == 0
