"""Checkpoint selection on validation FID (spec 9): the criterion, the kept snapshot, resuming."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sidflow.config import EvalConfig
from sidflow.errors import ConfigError
from sidflow.run.checkpoint import is_checkpoint
from sidflow.run.selection import SELECTED, SnapshotSelector, snapshot_path, validation_score


def _row(images_seen: int, v1: float, v4: float, held_out: float = 50.0) -> dict:
    return {
        "images_seen": images_seen,
        "val_fid_1step": v1,
        "val_fid_4step": v4,
        "fid_1step": held_out,
        "fid_4step": held_out,
    }


def test_validation_score_is_the_mean_log_over_step_counts():
    assert validation_score(_row(0, 10.0, 1000.0), (1, 4)) == pytest.approx(math.log(100.0))
    assert validation_score(_row(0, 10.0, 1000.0), (4,)) == pytest.approx(math.log(1000.0))
    # relative change counts: halving one FID beats shaving 10 off a large one
    assert validation_score(_row(0, 60.0, 10.0), (1, 4)) < validation_score(_row(0, 50.0, 20.0), (1, 4))
    assert validation_score({"val_fid_1step": float("nan"), "val_fid_4step": 1.0}, (1, 4)) == math.inf
    assert validation_score({"val_fid_1step": 1.0}, (1, 4)) == math.inf


def _net(value: float) -> nn.Module:
    net = nn.Linear(3, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def test_selector_keeps_the_best_snapshot_on_disk_and_ignores_held_out_fid(tmp_path):
    sel = SnapshotSelector(tmp_path, (1, 4))
    assert sel.offer(_row(100, 40.0, 20.0, held_out=90.0), _net(1.0))
    assert not sel.offer(_row(200, 50.0, 25.0, held_out=1.0), _net(2.0))  # better held-out FID: ignored
    assert sel.offer(_row(300, 30.0, 18.0), _net(3.0))
    assert not sel.offer(_row(400, 31.0, 19.0), _net(4.0))
    assert is_checkpoint(tmp_path / SELECTED) and sel.best_row["images_seen"] == 300
    restored = sel.load_into(_net(0.0))
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in restored.parameters())
    # a resumed run compares against the kept snapshot
    again = SnapshotSelector(tmp_path, (1, 4))
    assert again.best_row["images_seen"] == 300
    assert again.best_score == pytest.approx(sel.best_score)
    assert not again.offer(_row(500, 35.0, 19.0), _net(5.0))


def test_selector_refuses_rows_without_validation_fid(tmp_path):
    with pytest.raises(ConfigError, match="eval.select=final"):
        SnapshotSelector(tmp_path, (1, 4)).offer({"images_seen": 1, "fid_1step": 3.0}, _net(1.0))


def test_validation_selection_needs_an_evaluation():
    with pytest.raises(ConfigError, match="eval.kind=digits"):
        EvalConfig(kind="none", select="validation")


def test_per_steps_selection_keeps_one_snapshot_per_step_count(tmp_path):
    sel = SnapshotSelector(tmp_path, (1, 4), per_steps=True)
    assert sel.offer(_row(100, 40.0, 20.0), _net(1.0)) == [(1,), (4,)]
    assert sel.offer(_row(200, 30.0, 25.0), _net(2.0)) == [(1,)]  # better 1-step, worse 4-step
    assert sel.offer(_row(300, 35.0, 15.0), _net(3.0)) == [(4,)]
    assert sel.offer(_row(400, 31.0, 16.0), _net(4.0)) == []
    assert sel.row_for(1)["images_seen"] == 200 and sel.row_for(4)["images_seen"] == 300
    assert sel.best_row["images_seen"] == 300  # the largest step count
    # sampling with k steps uses the snapshot of the nearest evaluated step count (ties: the larger)
    for steps, value, kept in ((1, 2.0, 1), (2, 2.0, 1), (3, 3.0, 4), (4, 3.0, 4), (None, 3.0, 4)):
        assert all(torch.equal(p, torch.full_like(p, value)) for p in sel.load_into(_net(0.0), steps).parameters())
        assert snapshot_path(tmp_path, steps) == tmp_path / SELECTED / f"{kept}step"
    assert not is_checkpoint(tmp_path / SELECTED)
    again = SnapshotSelector(tmp_path, (1, 4), per_steps=True)  # resumed
    assert again.row_for(1)["images_seen"] == 200 and again.row_for(4)["images_seen"] == 300
    assert again.offer(_row(500, 29.0, 15.5), _net(5.0)) == [(1,)]


def test_snapshot_path_without_selection_is_none(tmp_path):
    assert snapshot_path(tmp_path, 4) is None
    sel = SnapshotSelector(tmp_path, (1, 4))
    sel.offer(_row(100, 40.0, 20.0), _net(1.0))
    assert snapshot_path(tmp_path, 1) == snapshot_path(tmp_path, 4) == tmp_path / SELECTED


def test_per_steps_reporting_falls_back_to_the_final_weights_where_nothing_was_kept(tmp_path):
    from sidflow.run.selection import reported_row, selected_generators, selected_info

    sel = SnapshotSelector(tmp_path, (4, 1), per_steps=True)  # any order
    nan4 = {**_row(100, 30.0, float("nan")), "fid_1step": 40.0, "fid_4step": 20.0}
    assert sel.offer(nan4, _net(1.0)) == [(1,)]
    final, final_gen = {**_row(200, 35.0, float("nan")), "fid_1step": 45.0, "fid_4step": 21.0}, _net(2.0)
    assert sel.offer(final, final_gen) == [] and sel.kept and sel.row_for(4) is None
    gens = selected_generators(sel, final, final_gen, (4, 1))
    assert gens[4] is final_gen and torch.equal(next(gens[1].parameters()), torch.full((2, 3), 1.0))
    row = reported_row(sel, final, (4, 1))
    assert (row["fid_1step"], row["images_seen_1step"], row["fid_4step"], row["images_seen_4step"]) == (
        40.0,
        100,
        21.0,
        200,
    )
    info = selected_info(sel, tmp_path, (4, 1))
    assert info["by_steps"] == {"1": {"images_seen": 100, "path": "selected/1step"}}
    assert info["path"] == "selected/1step"
    assert sel.offer(_row(300, 40.0, 9.0), _net(3.0)) == [(4,)]
    assert sel.best_row["images_seen"] == 300  # the largest step count, whatever the order given
