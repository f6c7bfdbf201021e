"""Quality metrics for any image set (issue 13, in progress): the Fréchet distance of features
(:mod:`sidflow.metrics.frechet`), DINOv2 features for FD-DINOv2 and the CLIP score
(:mod:`sidflow.metrics.features`), reference features cached once on disk
(:mod:`sidflow.metrics.cache`). Models come from ``transformers`` (hub id or local folder)."""

from sidflow.metrics.frechet import FeatureStats, frechet_distance

__all__ = ["FeatureStats", "frechet_distance"]
