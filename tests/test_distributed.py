"""Data-parallel SiD under torchrun (gloo, CPU): 2 ranks reproduce one process (spec 6.1).

Every draw of the trainer is keyed by the global sample index, so two ranks with half of each
global batch each (and averaged gradients) must end with the weights of one process that sees the
whole batch, up to float32 summation order. The ranks run through the real CLI entry
(``python -m torch.distributed.run ... -m sidflow.cli distill``), resume from a checkpoint on both
ranks, and the coalesced gradient all-reduce is checked against the per-parameter one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sidflow.checkpoint import TENSORS
from sidflow.distributed import init_from_env
from sidflow.errors import ConfigError
from sidflow.testing import tiny_pipeline

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


_ALLREDUCE_WORKER = textwrap.dedent('''
    import torch
    import torch.distributed as dist
    from sidflow.distributed import all_reduce_mean_, broadcast_module_, init_from_env, reduce_metrics, shutdown

    torch.set_num_threads(1)
    ctx = init_from_env()
    assert ctx.world_size == 2 and ctx.backend == "gloo" and ctx.device.type == "cpu"
    gen = torch.Generator().manual_seed(100 + ctx.rank)          # different grads on each rank
    shapes = [((3, 4), torch.float32), ((5,), torch.float64), ((2, 1, 3), torch.float32), ((7,), torch.float32)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in shapes]
    for p in params[:-1]:                                         # the last one has no gradient
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    p0 = params[0]
    p0.grad = p0.grad.t().contiguous().t()                        # a non-contiguous gradient
    reference = [p.grad.clone() for p in params[:-1]]
    for g in reference:                                           # what the trainer does per parameter
        dist.all_reduce(g)
        g.div_(ctx.world_size)
    for bucket_bytes in (16, 2**20):                              # several buckets, then one per dtype
        saved = [p.grad.clone() for p in params[:-1]]
        all_reduce_mean_(params, bucket_bytes=bucket_bytes)
        for p, ref in zip(params, reference):
            assert torch.equal(p.grad, ref), (bucket_bytes, p.grad, ref)
        assert params[-1].grad is None
        for p, s in zip(params, saved):
            p.grad = s
    module = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(module.weight, float(ctx.rank))
    broadcast_module_(module)
    assert torch.equal(module.weight, torch.zeros(2, 3))
    m = reduce_metrics({"loss_fake": 1.0 + ctx.rank, "nonfinite_gen": ctx.rank + 1, "k": 2})
    assert m == {"loss_fake": 1.5, "nonfinite_gen": 3, "k": 2}, m
    shutdown(ctx)
    print("ok", ctx.rank)
''')


def test_coalesced_all_reduce_equals_per_parameter(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_ALLREDUCE_WORKER)
    out = _torchrun([str(script)])
    assert "ok 0" in out.stdout and "ok 1" in out.stdout


def test_init_from_env_single_process_and_errors():
    ctx = init_from_env({})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend, ctx.owns_group) == (0, 1, True, None, False)
    assert init_from_env({"WORLD_SIZE": "1"}).world_size == 1
    with pytest.raises(ConfigError, match="RANK is not"):
        init_from_env({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        init_from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="outside"):
        init_from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                       "MASTER_PORT": "1"})


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    tensors = load_file(run / "checkpoints" / f"step-{step:08d}" / TENSORS)
    return {k: v for k, v in tensors.items() if k.split("/")[0] in ("generator", "fake", "ema")}


def _distill(run: Path, overrides: list[str]) -> list[str]:
    return ["-m", "sidflow.cli", "distill", "--preset", "sd3-medium-4step", "--run-dir", str(run), *overrides]


def test_two_ranks_match_one_process_and_resume(tmp_path):
    teacher = tiny_pipeline("sd3", tmp_path / "pipes")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cone\n")
    common = [f"teacher.path={teacher}", "teacher.time_scale=1000", "teacher.gradient_checkpointing=off",
              f"data.prompts={prompts}", "data.resolution=32", "train.batch=4", "train.batch_gpu=1",
              "train.total_kimg=none", "train.ckpt_every=2", "train.log_every=1", "eval.kind=none",
              "eval.grid_size=2", "eval.teacher_grid_steps=1", "eval.student_steps=1",
              "guidance.kappa1=2", "train.ema_halflife_kimg=0.01", "optim.lr=1e-3", "optim.glr=1e-3"]
    two, one = tmp_path / "two", tmp_path / "one"
    # 2 ranks x 2 rounds of 1 sample; stop at 2 iterations, then resume on both ranks to 3
    _torchrun(_distill(two, [*common, "train.max_steps=2"]))
    out = _torchrun(_distill(two, [*common, "train.max_steps=3"]))
    assert out.stdout.count("resumed from") == 1   # rank 0 prints it; both ranks load it
    # one process x 4 rounds of 1 sample
    subprocess.run([sys.executable, *_distill(one, [*common, "train.max_steps=3"])], env=_env(),
                   check=True, capture_output=True, timeout=300)

    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["iterations"] == 3 and metrics["world_size"] == 2
    for step in (2, 3):
        ours, ref = _weights(two, step), _weights(one, step)
        assert set(ours) == set(ref) and any(k.startswith("ema/") for k in ref)
        for key, value in ref.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    start = _weights(two, 2)   # the networks did move (lr 1e-3): the comparison is not vacuous
    assert any(not torch.equal(start[k], v) for k, v in _weights(two, 3).items())
    rows2 = [json.loads(r) for r in (two / "log.jsonl").read_text().splitlines()]
    rows1 = [json.loads(r) for r in (one / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows2] == [0, 1, 2] == [r["iteration"] for r in rows1]
    for a, b in zip(rows2, rows1, strict=True):   # logged losses are job-wide (averaged over ranks)
        assert a["loss_fake"] == pytest.approx(b["loss_fake"], rel=1e-4)
        assert a["loss_gen"] == pytest.approx(b["loss_gen"], rel=1e-4, abs=1e-6)
    for name in ("report.md", "samples.png", "generator_pipeline/model_index.json"):
        assert (two / name).exists(), name
