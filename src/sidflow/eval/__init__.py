"""Evaluation: the protocol a run scores its generator with, Fréchet distances, grids and reports."""

from sidflow.eval.metrics import FeatureStats, frechet_distance
from sidflow.eval.protocol import Evaluation

__all__ = ["Evaluation", "FeatureStats", "frechet_distance"]
