"""sidflow.run.checkpoint: atomic safetensors + JSON round trip, exact resume, corrupt-file errors."""

from __future__ import annotations

import copy
import json

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
