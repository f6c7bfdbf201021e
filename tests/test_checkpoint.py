"""sidflow.run.checkpoint: atomic safetensors + JSON round trip, exact resume, corrupt-file errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from sidflow.config import GeneratorConfig, GuidanceConfig, OptimConfig, SiDConfig, TrainConfig, to_dict
from sidflow.errors import CheckpointError
from sidflow.run.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sidflow.toy import GMMCondSource, GMMDenoiser, MLPDenoiser, make_mixture
from sidflow.trainer import SiDTrainer

CFG = SiDConfig(
    generator=GeneratorConfig(num_steps=2),
    guidance=GuidanceConfig(kappa1=2.0),
    optim=OptimConfig(lr=1e-3, glr=1e-3),
    train=TrainConfig(batch=8, batch_gpu=4, seed=1, ema_halflife_kimg=0.05),
)


def _trainer(init_seed=0, hidden=16):
    torch.manual_seed(init_seed)
    mlp = MLPDenoiser((2,), 4, hidden=hidden, depth=2)
    return SiDTrainer(
        GMMDenoiser(make_mixture("2d")), copy.deepcopy(mlp), copy.deepcopy(mlp), GMMCondSource(4), (2,), CFG
    )


def test_resume_is_bitwise_identical(tmp_path):
    ref = _trainer()
    for _ in range(2):
        ref.step()
    path = save_checkpoint(tmp_path, ref.iteration, ref.state_dict(), to_dict(CFG))
    assert latest_checkpoint(tmp_path) == path and not list(path.parent.glob(".*"))  # no temp left
    ref.step()
    resumed = _trainer(init_seed=5)  # different initial weights: everything must come from the file
    state, config = load_checkpoint(path)
    assert config == to_dict(CFG) and state["step"] == 2
    resumed.load_state_dict(state)
    assert resumed.iteration == 2 and resumed.images_seen == 16
    resumed.step()
    want, got = ref.state_dict()["tensors"], resumed.state_dict()["tensors"]
    assert set(want) == set(got)
    for key, value in want.items():
        assert torch.equal(value, got[key]), key


def test_latest_checkpoint_picks_highest_complete(tmp_path):
    tr = _trainer()
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 3, tr.state_dict())
    p10 = save_checkpoint(tmp_path, 10, tr.state_dict())
    save_checkpoint(tmp_path, 10, tr.state_dict())  # overwrite in place
    (tmp_path / "checkpoints" / "step-00000020").mkdir()  # incomplete: ignored
    assert latest_checkpoint(tmp_path) == p10


def test_corrupt_missing_and_mismatched_checkpoints(tmp_path):
    tr = _trainer()
    path = save_checkpoint(tmp_path, 1, tr.state_dict())
    with pytest.raises(CheckpointError, match="not a sidflow checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, 2, tr.state_dict())
    meta = json.loads((path / "state.json").read_text())
    key = next(iter(meta["shapes"]))
    meta["shapes"][key] = [999]
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    bigger = _trainer(hidden=32)
    state, _ = load_checkpoint(save_checkpoint(tmp_path, 3, tr.state_dict()))
    with pytest.raises(CheckpointError, match="shape"):
        bigger.load_state_dict(state)
    state["tensors"].pop(next(k for k in state["tensors"] if k.startswith("fake/")))
    with pytest.raises(CheckpointError, match="keys differ"):
        tr.load_state_dict(state)


def test_keep_n_prunes_old_checkpoints_and_leftovers(tmp_path):
    from sidflow.run.checkpoint import prune_checkpoints, save_trainer

    tr = _trainer()
    (tmp_path / "checkpoints" / ".step-00000001.abc").mkdir(parents=True)  # a killed write's leftover
    for _ in range(4):
        tr.step()
        save_trainer(tr, tmp_path, to_dict(CFG), is_main=True, sharded=False, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    assert prune_checkpoints(tmp_path, 0) == []  # 0 keeps everything
    assert prune_checkpoints(tmp_path, 1) == [tmp_path / "checkpoints" / "step-00000003"]


def test_generator_alone_is_read_without_the_optimiser_state(tmp_path):
    from sidflow.run.checkpoint import checkpoint_keys

    tr = _trainer()
    tr.step()
    path = save_checkpoint(tmp_path, 1, tr.state_dict(), to_dict(CFG))
    keys = checkpoint_keys(path)
    assert any(k.startswith("optim_gen/") for k in keys) and any(k.startswith("ema/") for k in keys)
    state, _ = load_checkpoint(path, prefixes=("ema/",))
    assert state["tensors"] and all(k.startswith("ema/") for k in state["tensors"])
    for name, value in tr.ema.items():
        assert torch.equal(state["tensors"][f"ema/{name}"], value)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    """SIGKILL a process while it writes a large checkpoint: the previous one is still the newest."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    tr = _trainer()
    tr.step()
    first = save_checkpoint(tmp_path, 1, tr.state_dict(), to_dict(CFG))
    writer = textwrap.dedent(f"""
        import torch
        from sidflow.run.checkpoint import save_checkpoint
        big = {{"tensors": {{f"w{{i}}": torch.randn(1024, 1024) for i in range(64)}}, "scalars": {{}}}}
        print("ready", flush=True)
        while True:
            save_checkpoint({str(tmp_path)!r}, 2, big)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # mid-write of a 256 MiB file (each write takes longer than this)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    newest = latest_checkpoint(tmp_path)
    assert newest in (first, tmp_path / "checkpoints" / "step-00000002")  # never a half-written one
    state, _ = load_checkpoint(newest)  # loads without error
    assert state["step"] in (1, 2)
    assert (newest == first) or len(state["tensors"]) == 64


def test_sharded_checkpoint_resume_is_bitwise_identical(tmp_path):
    """save_trainer writes torch.distributed.checkpoint shards (one process here); a fresh trainer
    resumed from them continues exactly like the original."""
    from sidflow.run.checkpoint import (
        DCP_METADATA,
        GENERATOR,
        read_generator,
        read_network,
        resume_trainer,
        save_trainer,
    )

    a = _trainer()
    for _ in range(2):
        a.step()
    path = save_trainer(a, tmp_path, to_dict(CFG), is_main=True, sharded=False)
    assert path is not None and (path / DCP_METADATA).is_file() and (path / GENERATOR).is_file()
    assert latest_checkpoint(tmp_path) == path
    b = _trainer(init_seed=7)  # different initial weights: everything must come from the checkpoint
    assert resume_trainer(b, tmp_path, rank=0, sharded=False) == path
    assert (b.iteration, b.images_seen) == (2, 16)
    for _ in range(2):
        a.step(), b.step()
    for (ka, va), (kb, vb) in zip(a.state_dict()["tensors"].items(), b.state_dict()["tensors"].items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    ema = read_generator(path)  # the generator alone, EMA weights, no optimiser state read
    assert set(ema) == set(dict(a.generator.named_parameters())) | {k for k, _ in a.generator.named_buffers()}
    weights = read_network(path, "generator")
    assert set(weights) == set(a.generator.state_dict())
    assert any(not torch.equal(ema[k], weights[k]) for k in weights)  # the EMA is not the weights


def test_a_kill_during_a_sharded_checkpoint_write_leaves_a_loadable_one(tmp_path):
    """SIGKILL a process that keeps rewriting a ~200 MB torch.distributed.checkpoint checkpoint of
    step 2 (so the replace-an-existing-folder path runs too): the newest complete one still resumes."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    from sidflow.run.checkpoint import resume_trainer, save_trainer

    big = _trainer(hidden=1536)
    big.step()
    first = save_trainer(big, tmp_path, {}, is_main=True, sharded=False)
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import _trainer
        from sidflow.run.checkpoint import save_trainer
        tr = _trainer(hidden=1536)
        tr.step(); tr.step()
        print("ready", flush=True)
        while True:
            save_trainer(tr, {str(tmp_path)!r}, {{}}, is_main=True, sharded=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # the first write is done by now and the loop is rewriting it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    newest = latest_checkpoint(tmp_path)
    assert newest in (first, tmp_path / "checkpoints" / "step-00000002")
    fresh = _trainer(hidden=1536, init_seed=3)
    assert resume_trainer(fresh, tmp_path, rank=0, sharded=False) == newest
    assert fresh.iteration in (1, 2)
