"""The contract between a run and its evaluation (``eval.kind``), whatever the teacher.

An evaluation scores the (EMA) generator at fixed prompts and seeds during and after a run. Each
row it returns holds ``images_seen`` and, per evaluated step count ``k``, ``fid_{k}step`` (the
reported figure) and, when the evaluation has a validation reference that the reported figures
never use, ``val_fid_{k}step`` (what snapshot selection compares, spec 9); other keys are free.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from sidflow.core.denoiser import Denoiser

__all__ = ["Evaluation"]


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
