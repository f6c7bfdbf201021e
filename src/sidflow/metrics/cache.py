"""Features of a reference set, computed once and cached on disk (safetensors + JSON).

A reference set (real images, a teacher's samples) is scored against many snapshots; its features
are computed once and kept as ``<key>.safetensors`` (``features`` ``[N, D]`` float64, plus ``mu`` and
``sigma`` of their Gaussian fit) with ``<key>.json`` beside it naming what produced them: the
extractor, its preprocessing (:meth:`~sidflow.metrics.features.Preprocess.describe`) and the
source's identity (file names with sizes and modification times, or any JSON the caller gives). The
key is a hash of that description, so another extractor, another preprocessing or a changed source
never reads stale features. Files are written atomically; an unreadable cache entry is recomputed
(with a one-line note), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sidflow.atomic import atomic_file
from sidflow.metrics.frechet import FeatureStats

__all__ = ["cached_features", "load_cached", "store_cached", "source_identity", "cache_key"]

log = logging.getLogger(__name__)


def source_identity(paths: list[Path]) -> list[dict[str, Any]]:
    """What identifies a set of files for the cache: name, size and modification time of each."""
    out = []
    for path in sorted(paths):
        stat = path.stat()
        out.append({"name": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def cache_key(description: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description."""
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _normalised(description: dict[str, Any]) -> Any:
    return json.loads(json.dumps(description, sort_keys=True, default=str))


def _paths(cache_dir: str | Path, description: dict[str, Any]) -> tuple[Path, Path]:
    key = cache_key(description)
    return Path(cache_dir) / f"{key}.safetensors", Path(cache_dir) / f"{key}.json"


def load_cached(cache_dir: str | Path | None, description: dict[str, Any]) -> tuple[Tensor, FeatureStats] | None:
    """The cached ``(features, fit)`` for ``description``, or None (absent, unreadable or another
    description under the same key; an unreadable entry is noted and left to be rewritten)."""
    if cache_dir is None:
        return None
    tensors, meta = _paths(cache_dir, description)
    if not (tensors.is_file() and meta.is_file()):
        return None
    try:
        stored = load_file(str(tensors))
        if json.loads(meta.read_text()).get("description") == _normalised(description):
            return stored["features"], FeatureStats(stored["mu"], stored["sigma"])
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as err:
        log.warning("feature cache %s is unreadable (%s); recomputing it", tensors, type(err).__name__)
    return None


def store_cached(cache_dir: str | Path | None, description: dict[str, Any], features: Tensor) -> FeatureStats:
    """Write ``features`` ``[N, D]`` (as float64) and their fit under ``description``, atomically;
    returns the fit (nothing is written when ``cache_dir`` is None)."""
    features = features.double().cpu().contiguous()
    stats = FeatureStats.of(features)
    if cache_dir is not None:
        tensors, meta = _paths(cache_dir, description)
        tensors.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(tensors) as tmp:
            save_file({"features": features, "mu": stats.mu.contiguous(), "sigma": stats.sigma.contiguous()}, str(tmp))
        record = {"description": _normalised(description), "n": len(features)}
        with atomic_file(meta) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return stats


def cached_features(
    cache_dir: str | Path | None, description: dict[str, Any], compute: Callable[[], Tensor]
) -> tuple[Tensor, FeatureStats, bool]:
    """``(features [N, D], their Gaussian fit, whether they came from the cache)``.

    Args:
        cache_dir: where cache entries live (None: compute, cache nothing).
        description: what produced the features (extractor name, preprocessing, source identity);
            it keys the entry and is written beside it.
        compute: called only when no valid entry exists; returns ``[N, D]`` features.
    """
    hit = load_cached(cache_dir, description)
    if hit is not None:
        return hit[0], hit[1], True
    features = compute().double().cpu().contiguous()
    return features, store_cached(cache_dir, description, features), False
