"""The contract between a run and its evaluation (``eval.kind``), whatever the teacher.

An evaluation scores the (EMA) generator at fixed prompts and seeds during and after a run. Each
row it returns holds ``images_seen`` and, per evaluated step count ``k``, its reported figures
``{name}_{k}step`` (names of :data:`FIGURES`: a distance such as ``fid`` or ``fd_dinov2``, and scores)
and, when the evaluation has a validation reference that the reported figures never use,
``val_{metric}_{k}step`` for its ``selection_metric`` (default ``fid``; what snapshot selection
compares, spec 9); other keys are free.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from sidflow.core.denoiser import Denoiser

__all__ = ["Evaluation", "FIGURES", "DISTANCE_KEYS", "SCORE_KEYS", "figures"]

# figure names in evaluation rows (``{name}_{k}step``) and their labels, in reporting order
FIGURES = {"fid": "FID", "fd_dinov2": "FD-DINOv2", "acc": "prompt acc", "clip": "CLIP score", "pickscore": "PickScore"}
DISTANCE_KEYS = ("fid", "fd_dinov2")  # lower is better
SCORE_KEYS = ("acc", "clip", "pickscore")  # higher is better


def figures(row: dict[str, Any], steps: int | str) -> dict[str, float]:
    """The reported figures of ``row`` for ``steps`` generator steps, by label, in reporting order."""
    return {label: row[f"{name}_{steps}step"] for name, label in FIGURES.items() if f"{name}_{steps}step" in row}


class Evaluation(Protocol):
    """What the run layer needs from an evaluation protocol (see :mod:`sidflow.run.registry`)."""

    def score_student(self, generator: Denoiser, images_seen: int) -> dict[str, Any]:
        """One evaluation row of ``generator`` after ``images_seen`` training images."""
        ...

    def describe(self, row: dict[str, Any]) -> str:
        """One console line for an evaluation row."""
        ...

    def teacher_reference(self) -> dict[str, Any]:
        """The teacher's figures on the same protocol (``{"rows", "best", "floor_fid"}``; may be empty)."""
        ...

    def grid(self, n: int) -> tuple[list[str], Tensor]:
        """``n`` prompts for the sample grids and their initial noise ``[n, *latent_shape]``."""
        ...
