"""The Fréchet distance and feature statistics the evaluations use: :mod:`sidflow.metrics`' (one
implementation, re-exported here for the evaluation protocol and the bundled digits evaluator)."""

from sidflow.metrics.frechet import FeatureStats, frechet_distance

__all__ = ["FeatureStats", "frechet_distance"]
