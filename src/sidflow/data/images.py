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
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sidflow.data.prompt_files import pick_column
from sidflow.errors import DataError

IMAGE_COLUMNS = ("image", "img", "jpg", "png")  # tried in this order when no column is named
__all__ = ["IMAGE_COLUMNS", "IMAGE_SUFFIXES", "list_images", "load_image", "iter_images", "source_files", "image_value"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(source: Any, resolution: int, channels: int = 3) -> Tensor:
    """One image ``[channels, R, R]`` in ``[-1, 1]`` from a path, bytes, a file object or a PIL image:
    RGB (or grey for ``channels=1``), shorter side to ``resolution`` (bicubic), centre crop."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    if isinstance(source, Image.Image):
        rgb = source.convert(mode)
    else:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as file:
            rgb = file.convert(mode)
    w, h = rgb.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
    pixels = pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def image_value(value: Any) -> Any:
    """A stored image as bytes, a path or a PIL image: ``datasets``' Image feature is written to
    parquet as ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


def _parquet_images(path: Path, column: str | None) -> Iterator[tuple[str, bytes | str]]:
    """The image column of a parquet file, one record batch in memory at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"reading {path} needs pyarrow: pip install 'sidflow[data]'") from err
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    name = pick_column(names, column, path, IMAGE_COLUMNS, "the image column")
    i = 0
    for batch in file.iter_batches(batch_size=64, columns=[name]):
        for value in batch.column(0).to_pylist():
            yield f"{path.name}[{i}]", image_value(value)
            i += 1


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
    share: tuple[int, int] = (0, 1),
) -> Iterator[tuple[list[int], Tensor]]:
    """Batches ``(indices, images [b, 3, R, R])`` of a folder or parquet file without ever holding
    more than one batch of pixels. The items (files, or rows) are cut into chunks of ``batch``; rank
    ``r`` of ``w`` (``share``) decodes only chunks ``c`` with ``c % w == r``; ``indices`` are item
    positions (global, so rows gathered from all ranks keep the source's order). Unreadable images
    are skipped and counted in ``skipped[0]`` (when given); a source with none readable is an error."""
    rank, world = share
    chunk, index, readable = [], [], 0
    for position, (_name, source) in enumerate(_items(spec, column)):
        if limit is not None and position >= limit:
            break
        if (position // batch) % world != rank:
            continue
        try:
            chunk.append(load_image(source if isinstance(source, bytes) else Path(source), resolution))
            index.append(position)
            readable += 1
        except (OSError, ValueError, SyntaxError):  # PIL's errors for unreadable and corrupt files
            if skipped is not None:
                skipped[0] += 1
        if (position + 1) % batch == 0 and chunk:
            yield index, torch.stack(chunk)
            chunk, index = [], []
    if chunk:
        yield index, torch.stack(chunk)
    if readable == 0 and world == 1:
        raise DataError(f"no readable images in {spec}; give a folder or a parquet file of images")
