"""Checkpoint selection on validation data (spec 9): keep the best evaluated generator snapshot.

The reference code keeps the snapshot with the best FID seen so far. We do the same, with one rule
that keeps reported figures honest: the selection metric never uses the data that the reported
figures are measured on. With the bundled digits the criterion is the *validation* FID, taken against
the 4,000 training digits (which the data-free student never sees), while the reported FID is taken
against the 1,000 held-out digits, which are never used for any choice.

The criterion is the mean, over the evaluated step counts, of ``log(val_fid)``: one generator serves
every step count, so a snapshot wins by being better on the whole, measured as relative change.
The winner lives in ``<run_dir>/selected/``, a checkpoint (safetensors + JSON, written atomically)
whose tensors are the evaluated generator's weights (EMA when on) under ``generator/``, and whose
scalars hold the evaluation row and the criterion, so a resumed run keeps comparing against it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from sidflow.checkpoint import is_checkpoint, load_checkpoint, load_module_weights, write_checkpoint
from sidflow.errors import ConfigError

__all__ = ["SELECTED", "SnapshotSelector", "validation_score"]

SELECTED = "selected"


def validation_score(row: dict[str, Any], steps: tuple[int, ...]) -> float:
    """Mean of ``log(val_fid_{k}step)`` over ``steps`` (lower is better); inf if any is missing or not finite."""
    values = [row.get(f"val_fid_{k}step") for k in steps]
    if any(v is None or not math.isfinite(v) or v <= 0 for v in values):
        return math.inf
    return sum(math.log(v) for v in values) / len(values)


class SnapshotSelector:
    """Offer each evaluated generator; the one with the lowest :func:`validation_score` is kept on disk."""

    def __init__(self, run_dir: str | Path, steps: tuple[int, ...], config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / SELECTED
        self.steps = tuple(steps)
        self.config = config or {}
        self.best_score, self.best_row = math.inf, None
        if is_checkpoint(self.path):  # a resumed run keeps its earlier winner
            state, _ = load_checkpoint(self.path)
            self.best_score = float(state["scalars"]["score"])
            self.best_row = dict(state["scalars"]["row"])

    def offer(self, row: dict[str, Any], generator: nn.Module) -> bool:
        """Keep ``generator`` (evaluated as ``row``) if it beats the best so far; returns whether it did."""
        score = validation_score(row, self.steps)
        if score == math.inf and not any(f"val_fid_{k}step" in row for k in self.steps):
            raise ConfigError("eval.select=validation needs validation FIDs (val_fid_*), which this "
                              "evaluation does not produce; use eval.select=final")
        if score >= self.best_score:
            return False
        tensors = {f"generator/{k}": v for k, v in generator.state_dict().items()}
        write_checkpoint(self.path, int(row.get("images_seen", 0)),
                         {"tensors": tensors, "scalars": {"score": score, "row": row}}, self.config)
        self.best_score, self.best_row = score, dict(row)
        return True

    def load_into(self, generator: nn.Module) -> nn.Module:
        """Load the kept weights into ``generator`` (in place) and return it."""
        state, _ = load_checkpoint(self.path, device=next(generator.parameters()).device)
        return load_module_weights(generator, state["tensors"], "generator/")
