"""Real images from disk: a folder of image files, or a parquet file with an image column (the
layout Hugging Face ``datasets`` writes: bytes, or a struct with ``bytes`` / ``path``).

Each image is converted to RGB, its shorter side resized to the target resolution (PIL bicubic,
antialiased by construction), and the centre square cropped, then mapped to ``[-1, 1]``, the range of
sidflow's decoded samples. An unreadable or corrupt file is skipped and counted (the count is
returned and printed by the callers), never silently dropped and never fatal.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sidflow.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image", "iter_images", "source_files"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(source: str | Path | bytes, resolution: int) -> Tensor:
    """One image ``[3, R, R]`` in ``[-1, 1]``: RGB, shorter side to ``resolution`` (bicubic), centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as file:
        rgb = file.convert("RGB")
    w, h = rgb.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def _parquet_images(path: Path, column: str | None) -> Iterator[tuple[str, bytes | str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"reading {path} needs pyarrow: pip install 'sidflow[data]'") from err
    schema = pq.read_schema(path)
    name = column or next((c for c in ("image", "img", "jpg", "png") if c in schema.names), None)
    if name is None or name not in schema.names:
        raise DataError(
            f"{path} has no image column {column or '(image/img/jpg/png)'}; its columns: {', '.join(schema.names)}"
        )
    table = pq.read_table(path, columns=[name])
    for i, value in enumerate(table.column(name).to_pylist()):
        if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        yield f"{path.name}[{i}]", value


def _items(spec: str | Path, column: str | None) -> Iterator[tuple[str, bytes | str | Path]]:
    path = Path(spec)
    if path.is_dir():
        return ((str(p), p) for p in list_images(path))
    if path.suffix == ".parquet" and path.is_file():
        return _parquet_images(path, column)
    raise DataError(f"image source {spec} is neither a folder of images nor a .parquet file; give one of them")


def source_files(spec: str | Path) -> list[Path]:
    """The files an image source reads (its identity for caches)."""
    path = Path(spec)
    return list_images(path) if path.is_dir() else [path]


def iter_images(
    spec: str | Path,
    resolution: int,
    *,
    batch: int,
    limit: int | None = None,
    column: str | None = None,
    skipped: list[int] | None = None,
) -> Iterator[tuple[list[int], Tensor]]:
    """Batches ``(indices, images [b, 3, R, R])`` of a folder or parquet file, in order, without ever
    holding more than one batch of pixels; ``indices`` count readable images. Unreadable images are
    skipped and counted in ``skipped[0]`` (when given)."""
    names_seen, chunk, index = 0, [], []
    for _name, source in _items(spec, column):
        if limit is not None and names_seen >= limit:
            break
        try:
            chunk.append(load_image(source if isinstance(source, bytes) else Path(source), resolution))
        except (OSError, ValueError, SyntaxError):  # PIL's errors for unreadable and corrupt files
            if skipped is not None:
                skipped[0] += 1
            continue
        index.append(names_seen)
        names_seen += 1
        if len(chunk) == batch:
            yield index, torch.stack(chunk)
            chunk, index = [], []
    if chunk:
        yield index, torch.stack(chunk)
    if names_seen == 0:
        raise DataError(f"no readable images in {spec}; give a folder or a parquet file of images")
