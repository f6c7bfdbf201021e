"""What a run says, in one place: ``log.jsonl`` rows, optional TensorBoard scalars, console lines.

Rank 0 only. Every row (training metrics at ``train.log_every``, evaluation rows) goes to
``log.jsonl``, and to TensorBoard (``<run>/tensorboard``, x-axis: training images) when the
``[tensorboard]`` extra is installed. Console lines go through the progress bar so they do not tear it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["RunLogger"]


class RunLogger:
    """``log.jsonl`` + TensorBoard + a tqdm progress bar for one rank-0 run.

    Args:
        run_dir: the run folder.
        total, initial: iterations of the run and the one it starts at (resume).
        images_seen: training images at the start (for the throughput).
        progress: show the progress bar.
    """

    def __init__(self, run_dir: Path, *, total: int, initial: int, images_seen: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.path = Path(run_dir) / "log.jsonl"
        self.writer = None
        try:  # optional: the [tensorboard] extra
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
            pass
        self.bar = tqdm(total=total, initial=initial, desc="SiD", unit="it", disable=not progress, dynamic_ncols=True)
        self._train_seconds, self._images = 0.0, images_seen

    def row(self, row: dict[str, Any]) -> None:
        """Append one row to ``log.jsonl`` and its numbers to TensorBoard (step = training images)."""
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "images_seen"):
                    self.writer.add_scalar(key, value, row["images_seen"])

    def throughput(self, images_seen: int, train_seconds: float) -> float:
        """Training images per second (all ranks) since the previous call, over training time only
        (evaluations and checkpoints excluded); measured at log points, where the host read of the
        losses has waited for the device."""
        rate = (images_seen - self._images) / max(train_seconds - self._train_seconds, 1e-9)
        self._train_seconds, self._images = train_seconds, images_seen
        return rate

    def advance(self, postfix: dict[str, Any] | None = None) -> None:
        """One iteration done; ``postfix``: figures to show (at log points)."""
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(postfix)

    def say(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
