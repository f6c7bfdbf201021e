"""A set of text-to-image metrics computed together: what ``eval.metrics`` names, with the models
that compute them.

* ``fd_dinov2``: Fréchet distance of DINOv2 class-token features (lower is better);
* ``fid``: Fréchet distance of Inception pool features, the classic FID (the ``[fid]`` extra; where
  it does not install it is skipped with :data:`~sidflow.metrics.features.FID_EXTRA`, never faked);
* ``clip``: mean CLIP score of each image against its prompt (higher is better);
* ``pickscore``: mean PickScore of each image against its prompt (higher is better).

Work is split in two so that ranks can share it: :meth:`ImageMetrics.rows` turns a slice of images
(and their prompts) into per-image rows (features ``[n, D]`` or scores ``[n]``); rows of all slices are
concatenated (``sidflow.collectives.gather_rows``) and :meth:`ImageMetrics.summarise` turns them into
figures against a reference's Gaussian fits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sidflow.metrics.features import (
    FID_EXTRA,
    ClipEmbedder,
    DinoV2Features,
    InceptionFeatures,
    clip_scores,
    pick_scores,
)
from sidflow.metrics.frechet import FeatureStats, frechet_distance

__all__ = ["METRICS", "DISTANCES", "ImageMetrics", "MetricModels"]

METRICS = ("fd_dinov2", "fid", "clip", "pickscore")
DISTANCES = {"fd_dinov2": "dino", "fid": "inception"}  # distance -> the image features it compares
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class MetricModels:
    """Where each metric's model comes from (hub ids or local folders; never bundled)."""

    def __init__(
        self,
        dino: str | Path = "facebook/dinov2-large",
        clip: str | Path = "openai/clip-vit-large-patch14",
        pickscore: str | Path = PICKSCORE,
        pickscore_tokenizer: str | Path = PICKSCORE_TOKENIZER,
    ) -> None:
        self.dino, self.clip = str(dino), str(clip)
        self.pickscore, self.pickscore_tokenizer = str(pickscore), str(pickscore_tokenizer)


class ImageMetrics:
    """The metrics ``names`` (a subset of :data:`METRICS`), their models loaded once on ``device``.

    ``fid`` without the ``[fid]`` extra is dropped with one warning and listed in :attr:`skipped`.
    """

    def __init__(
        self,
        names: Sequence[str],
        models: MetricModels | None = None,
        device: torch.device | str = "cpu",
        *,
        batch: int = 32,
    ) -> None:
        unknown = [n for n in names if n not in METRICS]
        if unknown or not names:
            raise ValueError(f"eval.metrics={','.join(names)!r}: choose from {', '.join(METRICS)}")
        models = models or MetricModels()
        self.skipped: dict[str, str] = {}
        self.dino = DinoV2Features(models.dino, device, batch=batch) if "fd_dinov2" in names else None
        self.inception = None
        if "fid" in names:
            try:
                self.inception = InceptionFeatures(device, batch=batch)
            except ImportError:  # named in `skipped`; the caller says so once
                self.skipped["fid"] = FID_EXTRA
        self.clip = ClipEmbedder(models.clip, device, batch=batch) if "clip" in names else None
        self.pickscore = (
            ClipEmbedder(models.pickscore, device, tokenizer=models.pickscore_tokenizer, batch=batch)
            if "pickscore" in names
            else None
        )
        self.names = tuple(n for n in names if n not in self.skipped)

    @property
    def extractors(self) -> dict[str, DinoV2Features | InceptionFeatures]:
        """Image-feature extractors by row name (those the distances need)."""
        out: dict[str, DinoV2Features | InceptionFeatures] = {}
        if self.dino is not None:
            out["dino"] = self.dino
        if self.inception is not None:
            out["inception"] = self.inception
        return out

    def _models(self) -> list[Any]:
        return [m for m in (self.dino, self.inception, self.clip, self.pickscore) if m is not None]

    @contextmanager
    def on(self, device: torch.device | str) -> Iterator[ImageMetrics]:
        """The models on ``device`` inside the block, back in host memory after it (they cost about
        7 GB of a GPU in fp32, so they visit it only while scoring)."""
        device = torch.device(device)
        homes = [m.device for m in self._models()]
        for m in self._models():
            m.model.to(device)
            m.device = device
        try:
            yield self
        finally:
            for m, home in zip(self._models(), homes, strict=True):
                m.model.to(home)
                m.device = home

    def describe(self, row: str) -> dict[str, Any]:
        """What produces row ``row`` (keys a reference cache entry): the model and its preprocessing."""
        if row in self.extractors:
            extractor = self.extractors[row]
            if isinstance(extractor, InceptionFeatures):
                return {"extractor": extractor.name, "row": row, "preprocess": extractor.describe()}
            return {"extractor": extractor.name, "row": row, "preprocess": extractor.preprocess.describe()}
        scorer = {"clip": self.clip, "pickscore": self.pickscore}[row]
        assert scorer is not None
        return {"extractor": scorer.name, "row": row, "preprocess": scorer.preprocess.describe()}

    def rows(self, images: Tensor, prompts: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-image rows of ``images`` ``[n, 3, H, W]`` in ``[-1, 1]``: features for the distances,
        and (with ``prompts``) the CLIP / PickScore of each image against its prompt."""
        out = {row: extractor(images) for row, extractor in self.extractors.items()}
        if prompts is not None and self.clip is not None:
            out["clip"] = clip_scores(images, prompts, self.clip)
        if prompts is not None and self.pickscore is not None:
            out["pickscore"] = pick_scores(images, prompts, self.pickscore)
        return out

    def summarise(self, rows: dict[str, Tensor], reference: dict[str, FeatureStats] | None) -> dict[str, float]:
        """Figures from all images' rows; the distances need ``reference`` (Gaussian fits by row)."""
        out: dict[str, float] = {}
        for name in self.names:
            if name in DISTANCES:
                if reference is not None:
                    out[name] = frechet_distance(rows[DISTANCES[name]], reference[DISTANCES[name]])
            else:
                out[name] = float(rows[name].double().mean())
        return out
