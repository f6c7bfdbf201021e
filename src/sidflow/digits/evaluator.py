"""The digit evaluator: a small CNN classifier whose 64-d penultimate features define the FID.

Two figures, always over the same prompts and seeds (1,000 samples, 100 per class):

* prompt accuracy: the share of samples the classifier reads as the prompted digit;
* FID: the Fréchet distance (Heusel et al., 2017) between Gaussians fitted to the 64-d features of
  the samples and of the 1,000 held-out real digits,
  ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``.

The held-out reference statistics (mean, covariance) ship with the classifier, so a plain
``pip install`` can score samples without the digits. So do the statistics of the 4,000 training
digits: a *validation* FID against them lets a data-free run pick its best snapshot without ever
touching the held-out digits (the student never sees any digit; only the teacher was trained on them).

The Fréchet distance is :func:`sidflow.eval.metrics.frechet_distance` (float64).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sidflow.digits import ASSETS
from sidflow.errors import DataError
from sidflow.eval.metrics import FeatureStats, frechet_distance

__all__ = [
    "DigitClassifier",
    "Evaluator",
    "FeatureStats",
    "frechet_distance",
    "train_classifier",
]

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """Conv net on ``[B, 1, 32, 32]`` digits in [-1, 1]; ``features`` is the 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Linear(64 * 16, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 32, 32]`` -> ``[B, 64]`` pre-activation penultimate features."""
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 32, 32]`` -> ``[B, 10]`` logits."""
        return self.head(torch.relu(self.features(x)))


def _shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translations by up to ``max_shift`` pixels (background -1 fills in)."""
    pad = nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = pad[i, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return out


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 8,
    batch: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> DigitClassifier:
    """Train the classifier on the training split (shift augmentation, Adam, cross-entropy)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * ((len(labels) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = tqdm(total=steps, desc="evaluator", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for idx in perm.split(batch):
            loss = nn.functional.cross_entropy(model(_shift_augment(images[idx], gen)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


class Evaluator:
    """Scores generated digits: prompt accuracy and FID against the held-out reference statistics."""

    WEIGHTS = "classifier.safetensors"
    REFERENCE = "held_out_stats.safetensors"
    VALIDATION = "train_stats.safetensors"
    INFO = "evaluator.json"

    def __init__(
        self,
        model: DigitClassifier,
        reference: FeatureStats,
        info: dict | None = None,
        validation: FeatureStats | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.reference = reference
        self.validation = validation  # training-split statistics (checkpoint selection), if shipped
        self.info = dict(info or {})

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, 1, 32, 32]`` in [-1, 1] -> (``[N, 64]`` features, ``[N, 10]`` logits)."""
        feats, logits = [], []
        for x in images.float().clamp(-1, 1).split(batch):
            f = self.model.features(x)
            feats.append(f)
            logits.append(self.model.head(torch.relu(f)))
        return torch.cat(feats), torch.cat(logits)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of ``images`` classified as ``labels`` (the prompted digits)."""
        _, logits = self.features_and_logits(images)
        return float((logits.argmax(1) == labels).float().mean())

    def fid(self, images: torch.Tensor, reference: FeatureStats | None = None) -> float:
        """FID of ``images`` against ``reference`` (default: the held-out digits)."""
        feats, _ = self.features_and_logits(images)
        return frechet_distance(FeatureStats.of(feats), reference or self.reference)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """``{"fid": ..., "accuracy": ...}`` for one set of samples, plus ``"val_fid"`` (against the
        training split) when the evaluator has validation statistics."""
        feats, logits = self.features_and_logits(images)
        stats = FeatureStats.of(feats)
        out = {
            "fid": frechet_distance(stats, self.reference),
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
        }
        if self.validation is not None:
            out["val_fid"] = frechet_distance(stats, self.validation)
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, folder / self.WEIGHTS)
        self.reference.save(folder / self.REFERENCE)
        if self.validation is not None:
            self.validation.save(folder / self.VALIDATION)
        (folder / self.INFO).write_text(json.dumps(self.info, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path | None = None) -> Evaluator:
        """Load the evaluator from ``folder`` (default: the one bundled with sidflow)."""
        folder = Path(folder) if folder is not None else ASSETS / "evaluator"
        if not (folder / cls.WEIGHTS).is_file():
            raise DataError(f"no evaluator at {folder}: run 'sidflow teacher train' to build one")
        model = DigitClassifier()
        model.load_state_dict(load_file(folder / cls.WEIGHTS))
        val_path = folder / cls.VALIDATION
        info_path = folder / cls.INFO
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        return cls(
            model,
            FeatureStats.load(folder / cls.REFERENCE),
            info,
            validation=FeatureStats.load(val_path) if val_path.is_file() else None,
        )
