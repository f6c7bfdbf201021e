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
from typing import Any, cast

from torch import nn

from sidflow.errors import ConfigError
from sidflow.run.checkpoint import is_checkpoint, load_checkpoint, load_module_weights, write_checkpoint
from sidflow.teachers.lora import copy_sharing_base

__all__ = [
    "SELECTED",
    "SnapshotSelector",
    "snapshot_path",
    "validation_score",
    "kept_note",
    "selected_generators",
    "reported_row",
    "selected_info",
]

SELECTED = "selected"


def validation_score(row: dict[str, Any], steps: tuple[int, ...], metric: str = "fid") -> float:
    """Mean of ``log(val_{metric}_{k}step)`` over ``steps`` (a distance: lower is better); inf if any
    is missing or not finite."""
    values = [row.get(f"val_{metric}_{k}step") for k in steps]
    if any(v is None or not math.isfinite(v) or v <= 0 for v in values):
        return math.inf
    return sum(math.log(cast(float, v)) for v in values) / len(values)  # all present and finite here


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

    def __init__(
        self,
        run_dir: str | Path,
        steps: tuple[int, ...],
        config: dict[str, Any] | None = None,
        *,
        per_steps: bool = False,
        metric: str = "fid",
    ) -> None:
        root = Path(run_dir) / SELECTED
        self.steps, self.per_steps, self.metric = tuple(steps), per_steps, metric
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
            return "lowest validation FID, for each step count separately"
        return f"lowest mean log validation FID over {', '.join(map(str, self.steps))} steps"

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
        if not any(f"val_{self.metric}_{k}step" in row for k in self.steps):
            raise ConfigError(
                f"eval.select={'validation_per_steps' if self.per_steps else 'validation'} "
                f"needs validation figures (val_{self.metric}_*), which this evaluation does not produce; "
                "use eval.select=final"
            )
        won = []
        for track in self.tracks:
            score = validation_score(row, track.steps, self.metric)
            if score >= track.best_score:
                continue
            tensors = {f"generator/{k}": v for k, v in generator.state_dict().items()}
            write_checkpoint(
                track.path,
                int(row.get("images_seen", 0)),
                {"tensors": tensors, "scalars": {"score": score, "row": row}},
                self.config,
            )
            track.best_score, track.best_row = score, dict(row)
            won.append(track.steps)
        return won

    def load_into(self, generator: nn.Module, steps: int | None = None) -> nn.Module:
        """Load the weights kept for ``steps`` into ``generator`` (in place) and return it."""
        state, _ = load_checkpoint(self._track(steps).path, device=next(generator.parameters()).device)
        return load_module_weights(generator, state["tensors"], "generator/")


# ---- what the end of a run reports from the kept snapshots -------------------------------------
def kept_note(won: list[tuple[int, ...]], selector: SnapshotSelector | None) -> str:
    """Console suffix for an evaluation that won one or more criteria."""
    if not won:
        return ""
    if selector is None or not selector.per_steps:
        return " (best on validation so far)"
    return f" (best on validation so far at {', '.join(str(s[0]) for s in won)} steps)"


def selected_generators(
    selector: SnapshotSelector, final: dict[str, Any], final_gen: nn.Module, steps: tuple[int, ...]
) -> dict[int, nn.Module]:
    """The generator kept for each step count (the final one where it won or where nothing was kept,
    e.g. all its validation FIDs non-finite; one load per snapshot)."""
    loaded: dict[int, nn.Module] = {final["images_seen"]: final_gen}
    out = {}
    for k in steps:
        seen = (selector.row_for(k) or final)["images_seen"]
        if seen not in loaded:
            loaded[seen] = selector.load_into(copy_sharing_base(final_gen), k)
        out[k] = loaded[seen]
    return out


def reported_row(selector: SnapshotSelector, final: dict[str, Any], steps: tuple[int, ...]) -> dict[str, Any]:
    """One evaluation row with each step count's figures taken from the snapshot kept for it (the
    final row where none was kept); ``images_seen`` is that of the largest step count's snapshot."""
    main = selector.row_for(max(steps)) or final
    if not selector.per_steps:
        return main
    row = {"images_seen": main["images_seen"]}
    for k in steps:
        kept = selector.row_for(k) or final
        row.update({key: v for key, v in kept.items() if key.endswith(f"_{k}step")})
        row[f"images_seen_{k}step"] = kept["images_seen"]
    return row


def selected_info(selector: SnapshotSelector, run_dir: Path, steps: tuple[int, ...]) -> dict[str, Any]:
    """Which snapshots were kept (step counts whose criterion kept none are left out)."""
    kept = {k: row for k in steps if (row := selector.row_for(k)) is not None}
    main = max(kept)
    info: dict[str, Any] = {
        "images_seen": kept[main]["images_seen"],
        "path": str(selector.path_for(main).relative_to(run_dir)),
        "rule": selector.rule(),
    }
    if selector.per_steps:
        info["by_steps"] = {
            str(k): {"images_seen": row["images_seen"], "path": str(selector.path_for(k).relative_to(run_dir))}
            for k, row in kept.items()
        }
    return info
