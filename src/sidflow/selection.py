"""Checkpoint selection on validation data (spec 9): keep the best evaluated generator snapshot.

The reference code keeps the snapshot with the best FID seen so far (and, separately, the one with
the best CLIP score). We do the same, with one rule that keeps reported figures honest: the
selection metric never uses the data that the reported figures are measured on. With the bundled
digits the criterion is the *validation* FID, taken against the 4,000 training digits (which the
data-free student never sees), while the reported FID is taken against the 1,000 held-out digits,
which are never used for any choice.

Two rules (``eval.select``):

* ``validation``: one snapshot for every step count, the one with the lowest mean over the evaluated
  step counts of ``log(val_fid)`` (a relative change counts the same at every k). It lives in
  ``<run_dir>/selected/``.
* ``validation_per_steps``: one snapshot per evaluated step count k, the one with the lowest
  ``val_fid_{k}step``, in ``<run_dir>/selected/{k}step/`` (like the reference's separate FID and
  CLIP bests). The 1-step and the 4-step output then may come from different moments of the run;
  sampling with k steps uses the snapshot kept for the nearest evaluated step count.

Each kept snapshot is a checkpoint (safetensors + JSON, written atomically) whose tensors are the
evaluated generator's weights (EMA when on) under ``generator/``, and whose scalars hold the
evaluation row and the criterion, so a resumed run keeps comparing against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sidflow.checkpoint import is_checkpoint, load_checkpoint, load_module_weights, write_checkpoint
from sidflow.errors import ConfigError

__all__ = ["SELECTED", "SnapshotSelector", "snapshot_path", "validation_score"]

SELECTED = "selected"


def validation_score(row: dict[str, Any], steps: tuple[int, ...]) -> float:
    """Mean of ``log(val_fid_{k}step)`` over ``steps`` (lower is better); inf if any is missing or not finite."""
    values = [row.get(f"val_fid_{k}step") for k in steps]
    if any(v is None or not math.isfinite(v) or v <= 0 for v in values):
        return math.inf
    return sum(math.log(v) for v in values) / len(values)


def snapshot_path(run_dir: str | Path, steps: int | None = None) -> Path | None:
    """The kept snapshot that serves ``steps`` generator steps (None: the largest kept step count),
    or None when the run kept none. Per-step-count snapshots: the nearest evaluated k, ties to the larger."""
    root = Path(run_dir) / SELECTED
    if is_checkpoint(root):
        return root
    kept = {int(p.name[:-4]): p for p in root.glob("*step") if p.name[:-4].isdigit() and is_checkpoint(p)}
    if not kept:
        return None
    if steps is None:
        return kept[max(kept)]
    return kept[min(kept, key=lambda k: (abs(k - steps), -k))]


@dataclass
class _Track:
    """One kept snapshot: its criterion's step counts, its folder and the best so far."""

    steps: tuple[int, ...]
    path: Path
    best_score: float = math.inf
    best_row: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if is_checkpoint(self.path):  # a resumed run keeps its earlier winner
            state, _ = load_checkpoint(self.path)
            self.best_score = float(state["scalars"]["score"])
            self.best_row = dict(state["scalars"]["row"])


class SnapshotSelector:
    """Offer each evaluated generator; the best by :func:`validation_score` is kept on disk (one
    snapshot, or one per step count with ``per_steps``)."""

    def __init__(self, run_dir: str | Path, steps: tuple[int, ...], config: dict[str, Any] | None = None,
                 *, per_steps: bool = False) -> None:
        root = Path(run_dir) / SELECTED
        self.steps, self.per_steps = tuple(steps), per_steps
        self.config = config or {}
        specs = [((k,), root / f"{k}step") for k in self.steps] if per_steps else [(self.steps, root)]
        self.tracks = [_Track(s, p) for s, p in specs]

    @property
    def kept(self) -> bool:
        """Whether any snapshot is kept."""
        return any(t.best_row is not None for t in self.tracks)

    @property
    def best_row(self) -> dict[str, Any] | None:
        """The row kept for the largest step count (the only one without ``per_steps``)."""
        return self.row_for(None)

    @property
    def best_score(self) -> float:
        return self._track(None).best_score

    def rule(self) -> str:
        """The selection rule in words."""
        if self.per_steps:
            return "lowest validation FID (training digits), for each step count separately"
        return ("lowest mean log validation FID (training digits) over "
                f"{', '.join(map(str, self.steps))} steps")

    def _track(self, steps: int | None) -> _Track:
        if not self.per_steps:
            return self.tracks[0]
        if steps is None:
            return max(self.tracks, key=lambda t: t.steps[0])
        return min(self.tracks, key=lambda t: (abs(t.steps[0] - steps), -t.steps[0]))

    def row_for(self, steps: int | None = None) -> dict[str, Any] | None:
        """The evaluation row of the snapshot kept for ``steps`` (None = the largest step count)."""
        return self._track(steps).best_row

    def path_for(self, steps: int | None = None) -> Path:
        return self._track(steps).path

    def offer(self, row: dict[str, Any], generator: nn.Module) -> list[tuple[int, ...]]:
        """Keep ``generator`` (evaluated as ``row``) wherever it beats the best so far; returns the
        step counts of the criteria it won (empty when none)."""
        if not any(f"val_fid_{k}step" in row for k in self.steps):
            raise ConfigError(f"eval.select={'validation_per_steps' if self.per_steps else 'validation'} "
                              "needs validation FIDs (val_fid_*), which this evaluation does not produce; "
                              "use eval.select=final")
        won = []
        for track in self.tracks:
            score = validation_score(row, track.steps)
            if score >= track.best_score:
                continue
            tensors = {f"generator/{k}": v for k, v in generator.state_dict().items()}
            write_checkpoint(track.path, int(row.get("images_seen", 0)),
                             {"tensors": tensors, "scalars": {"score": score, "row": row}}, self.config)
            track.best_score, track.best_row = score, dict(row)
            won.append(track.steps)
        return won

    def load_into(self, generator: nn.Module, steps: int | None = None) -> nn.Module:
        """Load the weights kept for ``steps`` into ``generator`` (in place) and return it."""
        state, _ = load_checkpoint(self._track(steps).path, device=next(generator.parameters()).device)
        return load_module_weights(generator, state["tensors"], "generator/")
