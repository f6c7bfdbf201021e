"""Data-parallel SiD under torchrun (gloo, CPU): 2 ranks reproduce one process (spec 6.1, 16).

Every draw of the trainer is keyed by the global sample index, so two ranks with half of each
global batch each (and averaged gradients) must end with the weights of one process that sees the
whole batch, up to float32 summation order. Checked through the real CLI entry
(``python -m torch.distributed.run ... -m sidflow.cli distill``: 2 ranks resume a one-process run
and land on its weights, data parallel or with ``train.sharding=fsdp2``), and at the trainer level
with FSDP2-sharded networks (multi-step, one reduce-scatter per accumulation, plus a gathered-checkpoint
round trip). The coalesced gradient all-reduce equals the per-parameter one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import torch_env, torchrun  # noqa: I001  (tests/ on the path)
from safetensors.torch import load_file

from sidflow.errors import ConfigError
from sidflow.run.checkpoint import read_network
from sidflow.run.distributed import init_from_env
from sidflow.testing import tiny_pipeline

pytestmark = pytest.mark.slow


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    return torchrun(args, nproc, timeout)


_WORKER = textwrap.dedent("""
    import copy, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from sidflow import collectives
    from sidflow.run import distributed as sd

    torch.set_num_threads(1)
    ctx = sd.init_from_env()
    assert ctx.world_size == 2 and ctx.backend == "gloo" and ctx.device.type == "cpu"

    # ---- coalesced all-reduce == per-parameter all-reduce (what the trainer does) ----
    gen = torch.Generator().manual_seed(100 + ctx.rank)          # different grads on each rank
    shapes = [((3, 4), torch.float32), ((5,), torch.float64), ((2, 1, 3), torch.float32), ((7,), torch.float32)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in shapes]
    for p in params[:-1]:                                         # the last one has no gradient
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    params[0].grad = params[0].grad.t().contiguous().t()          # a non-contiguous gradient
    reference = [p.grad.clone() for p in params[:-1]]
    for g in reference:
        dist.all_reduce(g)
        g.div_(ctx.world_size)
    assert not torch.equal(reference[0], params[0].grad)
    for bucket_bytes in (16, 2**20):                              # several buckets, then one per dtype
        saved = [p.grad.clone() for p in params[:-1]]
        collectives.all_reduce_mean_(params, bucket_bytes=bucket_bytes)
        for p, ref in zip(params, reference):
            assert torch.equal(p.grad, ref), (bucket_bytes, p.grad, ref)
        assert params[-1].grad is None
        for p, s in zip(params, saved):
            p.grad = s
    module = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(module.weight, float(ctx.rank))
    collectives.broadcast_module_(module)
    assert torch.equal(module.weight, torch.zeros(2, 3))
    m = collectives.mean_over_ranks({"loss_fake": torch.tensor(1.0 + ctx.rank), "loss_gen": 2.0 * ctx.rank})
    assert m == {"loss_fake": 1.5, "loss_gen": 1.0}, m
    total = collectives.sum_over_ranks(torch.tensor(ctx.rank + 1))
    assert isinstance(total, torch.Tensor) and int(total) == 3
    open(f"{sys.argv[2]}/collectives-{ctx.rank}", "w").close()

    # ---- FSDP2: 2 sharded ranks == 1 unsharded process, checkpoint round trip ----
    from sidflow.cli.distill import resolve_config
    from sidflow.data.prompts import PromptSource
    from sidflow.run.build import load_run_teacher
    from sidflow.trainer import SiDTrainer

    cfg = resolve_config("sd3-medium-4step", [f"teacher.path={sys.argv[1]}", "teacher.time_scale=1000",
        "teacher.gradient_checkpointing=off", "data.resolution=32", "train.batch=4", "train.batch_gpu=1",
        "train.total_kimg=none", "train.max_steps=3", "guidance.kappa1=2", "optim.lr=1e-3", "optim.glr=1e-3",
        "train.ema_halflife_kimg=0.01", "optim.grad_clip=20", "train.accumulate=unsharded"])
    teacher = load_run_teacher(cfg, "cpu")
    shape = teacher.latent_shape(32)
    source = PromptSource(["a red cube", "a blue ball", "a green cone"], teacher)
    source.precompute()
    nets = teacher.make_denoisers()
    ref = SiDTrainer(*[copy.deepcopy(n) for n in nets], source, shape, cfg, "cpu")   # 1 process, 4 rounds

    def sharded_trainer():
        copies = [copy.deepcopy(n) for n in nets]
        sd.shard_networks(*copies)
        # the trainer's all_reduce_mean_ skips the DTensor grads FSDP2 already averaged
        return SiDTrainer(*copies, source, shape, cfg, "cpu", rank=ctx.rank, world_size=ctx.world_size)

    def assert_matches(trainer):
        ours, theirs = sd.gather_state(trainer.state_dict())["tensors"], ref.state_dict()["tensors"]
        assert set(ours) == set(theirs), set(ours) ^ set(theirs)
        for key, value in theirs.items():   # float32 summation order: relative to each tensor's scale
            scale = float(value.abs().max()) if value.numel() else 0.0
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6 + 1e-5 * scale, msg=key)

    tr = sharded_trainer()
    w = tr.generator.transformer.transformer_blocks[0].ff.net[0].proj.weight
    assert isinstance(w, DTensor) and w.to_local().numel() * 2 == w.numel()   # really sharded
    reduce_scatter, calls = dist.reduce_scatter_single, []   # what FSDP2 reduce-scatters grads with
    dist.reduce_scatter_single = lambda *a, **k: calls.append(1) or reduce_scatter(*a, **k)
    for _ in range(2):
        ref.step(), tr.step()
    dist.reduce_scatter_single = reduce_scatter
    # 2 rounds per rank, gradient sync on the last only: each block and root once per phase and step
    groups = len(tr.generator.transformer.transformer_blocks) + 1
    assert len(calls) == 2 * 2 * groups, (len(calls), groups)
    assert_matches(tr)
    full = sd.gather_state(tr.state_dict())
    resumed = sharded_trainer()                                   # fresh shards, load the full checkpoint
    resumed.load_state_dict(sd.shard_state_like(full, resumed))
    ref.step(), resumed.step()
    assert_matches(resumed)
    start = {k: v for k, v in full["tensors"].items() if k.startswith("generator/")}
    assert any(not torch.equal(v, ref.state_dict()["tensors"][k]) for k, v in start.items())   # moved
    sd.shutdown(ctx)
    open(f"{sys.argv[2]}/fsdp-{ctx.rank}", "w").close()
""")


def test_collectives_and_fsdp2_on_two_gloo_ranks(tmp_path):
    teacher = tiny_pipeline("sd3", tmp_path / "pipes")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    _torchrun([str(script), str(teacher), str(tmp_path)])
    for name in ("collectives-0", "collectives-1", "fsdp-0", "fsdp-1"):  # each rank got to its end
        assert (tmp_path / name).exists(), name


def test_init_from_env_single_process_and_errors():
    ctx = init_from_env({})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend, ctx.owns_group) == (0, 1, True, None, False)
    assert init_from_env({"WORLD_SIZE": "1"}).world_size == 1
    with pytest.raises(ConfigError, match="RANK is not"):
        init_from_env({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        init_from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="outside"):
        init_from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The networks of a run's checkpoint in full (torch.distributed.checkpoint shards assembled)."""
    path = run / "checkpoints" / f"step-{step:08d}"
    return {f"{name}/{k}": v for name in ("generator", "fake", "ema") for k, v in read_network(path, name).items()}


def _distill(run: Path, overrides: list[str]) -> list[str]:
    return ["-m", "sidflow.cli", "distill", "--preset", "sd3-medium-4step", "--run-dir", str(run), *overrides]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A one-process run (4 rounds of 1 sample per iteration, checkpoints at 2 and 3) and its overrides."""
    tmp_path = tmp_path_factory.mktemp("one_process")
    teacher = tiny_pipeline("sd3", tmp_path / "pipes")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cone\n")
    common = [
        f"teacher.path={teacher}",
        "teacher.time_scale=1000",
        "teacher.gradient_checkpointing=off",
        f"data.prompts={prompts}",
        "data.resolution=32",
        "train.batch=4",
        "train.batch_gpu=1",
        "train.total_kimg=none",
        "train.max_steps=3",
        "train.ckpt_every=2",
        "train.log_every=1",
        "eval.kind=none",
        "eval.grid_size=2",
        "eval.teacher_grid_steps=1",
        "eval.student_steps=1",
        "guidance.kappa1=2",
        "train.ema_halflife_kimg=0.01",
        "optim.lr=1e-3",
        "optim.glr=1e-3",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]  # the 2-rank runs read the cache this run wrote
    one = tmp_path / "one"
    cmd = [sys.executable, *_distill(one, common)]
    subprocess.run(cmd, env=torch_env(), check=True, capture_output=True, timeout=300)
    return one, common


@pytest.mark.parametrize("sharding", ["none", "fsdp2"])
def test_two_ranks_resume_a_one_process_run_and_match_it(one_process_run, tmp_path, sharding):
    """2 ranks (data parallel, or FSDP2-sharded) resume the one-process run at iteration 2 and match
    its iteration-3 checkpoint; under FSDP2 the checkpoint is gathered and the export is the EMA."""
    one, common = one_process_run
    two = tmp_path / "two"
    # its state at iteration 2, resumed by 2 ranks (2 rounds of 1 sample each) for the 3rd iteration
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("step-00000003", "metrics.json", "tensorboard"))
    rows1 = [json.loads(r) for r in (one / "log.jsonl").read_text().splitlines()]
    (two / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows1[:2]))
    out = _torchrun(_distill(two, [*common, f"train.sharding={sharding}"]))
    assert out.stdout.count("resumed from") == 1  # printed by rank 0; every rank loads it
    assert out.stdout.count("shard first and sharded over 2 ranks") == (sharding == "fsdp2")

    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["iterations"] == 3 and metrics["world_size"] == 2 and metrics["sharding"] == sharding
    ours, ref, start = _weights(two, 3), _weights(one, 3), _weights(one, 2)
    assert set(ours) == set(ref) and any(k.startswith("ema/") for k in ref)
    assert any(not torch.equal(start[k], v) for k, v in ref.items())  # the step moved the weights
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    rows2 = [json.loads(r) for r in (two / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows2] == [0, 1, 2] == [r["iteration"] for r in rows1]
    # the logged losses are job-wide (averaged over ranks), as one process reports them
    assert rows2[2]["loss_fake"] == pytest.approx(rows1[2]["loss_fake"], rel=1e-4)
    assert rows2[2]["loss_gen"] == pytest.approx(rows1[2]["loss_gen"], rel=1e-4, abs=1e-6)
    for name in ("report.md", "samples.png", "generator_pipeline/model_index.json"):
        assert (two / name).exists(), name
    # the exported transformer is the (gathered) EMA generator of the final checkpoint
    exported = load_file(two / "generator_pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = {k.removeprefix("ema/transformer."): v for k, v in ours.items() if k.startswith("ema/transformer.")}
    assert ema and set(ema) <= set(exported)
    assert all(torch.equal(exported[k], v) for k, v in ema.items())
    assert not all(torch.equal(exported[k], start["ema/transformer." + k]) for k in ema)  # not stale


def test_fsdp2_setting_and_its_single_process_fallback(capsys):
    from sidflow.config import SiDConfig, TrainConfig, apply_overrides
    from sidflow.run.build import use_fsdp2

    fsdp2 = apply_overrides(SiDConfig(), ["train.sharding=fsdp2"])
    assert fsdp2.train == TrainConfig(sharding="fsdp2") and SiDConfig().train.sharding == "none"
    with pytest.raises(ConfigError, match="sharding"):
        apply_overrides(SiDConfig(), ["train.sharding=ddp"])
    assert use_fsdp2(fsdp2, world_size=2) and not use_fsdp2(SiDConfig(), world_size=2)
    assert capsys.readouterr().out == ""
    assert not use_fsdp2(fsdp2, world_size=1)  # one process: unsharded, with a note
    assert "one process runs unsharded" in capsys.readouterr().out
