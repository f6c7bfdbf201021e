"""Real images with captions for SiDA (spec 7, 8): where they come from, their latents cached once,
and the keyed source the trainer draws them from.

Sources (``data.real``), each a table of (image, caption) items:

* a folder holding a captions file (``metadata.jsonl`` / ``captions.jsonl`` / ``metadata.csv`` /
  ``captions.csv``, or the captions file itself as ``data.real``) whose rows name an image
  (``file_name``, relative to the file's folder or its ``images/`` subfolder) and a caption (the first
  of ``caption`` / ``text`` / ``prompt``, or ``data.real_caption_column``): the layout of COCO and of
  the ``datasets`` image-folder loader;
* a parquet file with an image column (bytes, or the ``{"bytes", "path"}`` struct ``datasets``
  writes; ``data.real_image_column``, default ``image``) and a caption column;
* a local Hugging Face ``datasets`` folder (``save_to_disk``; ``folder::split``) with the same columns.

Each image is converted to the VAE's channels (RGB, or grey for a one-channel VAE), resized on its
shorter side to the run's resolution (PIL bicubic) and centre-cropped (:func:`sidflow.data.images.load_image`),
then encoded **once** by the teacher's VAE into its posterior mean and standard deviation in latent
space (``TeacherBase.encode_posterior``). Both are cached on disk in sharded safetensors
(:class:`~sidflow.data.embedding_cache.DiskEmbeddingCache`: the same bounded-memory, read-by-index
store as the text embeddings) in a folder keyed by the VAE, the resolution and the channels, each
row keyed by its image's identity (file name, size and modification time; parquet file and row;
dataset fingerprint and row). Under torchrun each rank encodes a disjoint share. An unreadable or
corrupt image is skipped and counted (printed once), never silently; a source without one readable
image is an error.

Draws (:class:`RealImageSource`) are keyed like the prompts: real sample ``i`` of an iteration is
item ``randint(seed, iteration, "real", i)``, its latent ``mean + std * n`` with ``n`` keyed too (a
fresh posterior sample each draw, as the reference's ``latent_dist.sample()``), its conditioning its
own caption's (spec 7.2's recommendation). In SiDA mode the generator's prompts are the same
captions (:attr:`RealImageSource.prompts`), drawn independently of the real images (spec 8: unpaired).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sidflow.collectives import barrier, is_distributed
from sidflow.core import rng
from sidflow.core.denoiser import Cond
from sidflow.data.embedding_cache import DiskEmbeddingCache
from sidflow.data.images import IMAGE_COLUMNS, image_value, load_image
from sidflow.data.prompt_files import SPLIT_SEPARATOR, pick_column
from sidflow.data.prompts import PromptSource
from sidflow.errors import DataError

__all__ = ["ImageTable", "read_image_table", "RealImageSource", "CAPTION_FILES", "IMAGE_COLUMNS"]

CAPTION_FILES = ("metadata.jsonl", "captions.jsonl", "metadata.csv", "captions.csv")
FILE_COLUMNS = ("file_name", "file", "image", "path")
CAPTION_COLUMNS = ("caption", "text", "prompt")


@dataclass
class ImageTable:
    """Items of a real-image source: an identity key, a caption and a reader of the image each."""

    keys: list[str]
    captions: list[str]
    read: Callable[[int], Any]  # item -> a Path, raw bytes or a PIL image
    where: str

    def __len__(self) -> int:
        return len(self.keys)


def _stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _caption_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            try:
                return [json.loads(line) for line in lines if line.strip()]
            except json.JSONDecodeError as err:
                raise DataError(f"{path} is not valid JSONL ({err.msg}); write one object per line") from None
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _folder_table(captions_file: Path, caption_column: str | None) -> ImageTable:
    rows = _caption_rows(captions_file)
    if not rows:
        raise DataError(f"{captions_file} has no rows; write one (file_name, caption) row per image")
    columns = list(rows[0])
    file_column = next((c for c in FILE_COLUMNS if c in columns), None)
    if file_column is None:
        raise DataError(f"{captions_file} names no image file (columns {', '.join(columns)}); add a file_name column")
    text_column = pick_column(columns, caption_column, captions_file, CAPTION_COLUMNS, "real_caption_column")
    root = captions_file.parent
    paths, keys, captions = [], [], []
    for row in rows:
        name = str(row[file_column])
        path = (
            root / name if (root / name).exists() or not (root / "images" / name).exists() else root / "images" / name
        )
        caption = str(row.get(text_column) or "").strip()
        paths.append(path)
        keys.append(_stat_key(path) if path.is_file() else f"{path.resolve()}|missing")
        captions.append(caption)
    return ImageTable(keys, captions, lambda i: paths[i], str(captions_file))


def _parquet_table(path: Path, image_column: str | None, caption_column: str | None) -> ImageTable:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow; pip install 'sidflow[data]'") from None
    names = pq.ParquetFile(path).schema_arrow.names
    image = pick_column(names, image_column, path, IMAGE_COLUMNS, "real_image_column")
    text = pick_column(names, caption_column, path, CAPTION_COLUMNS, "real_caption_column")
    captions = [str(c or "").strip() for c in pq.read_table(path, columns=[text]).column(text).to_pylist()]
    base = _stat_key(path)
    file = pq.ParquetFile(path)
    starts, total = [], 0
    for group in range(file.num_row_groups):
        starts.append(total)
        total += file.metadata.row_group(group).num_rows

    def read(i: int) -> Any:  # one row group at a time: never the whole image column in memory
        group = max(g for g, s in enumerate(starts) if s <= i)
        column = file.read_row_group(group, columns=[image]).column(image)
        return image_value(column[i - starts[group]].as_py())

    return ImageTable([f"{base}|{i}" for i in range(len(captions))], captions, read, str(path))


def _dataset_table(spec: str, image_column: str | None, caption_column: str | None) -> ImageTable:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the dataset {spec} needs datasets; pip install 'sidflow[data]'") from None
    folder, _, split = spec.partition(SPLIT_SEPARATOR)
    loaded = datasets.load_from_disk(folder)
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or "train"
        if chosen not in loaded:
            raise DataError(f"{folder} has no split {chosen!r} (it has: {', '.join(loaded)}); name one as ::SPLIT")
        loaded = loaded[chosen]
    path = Path(folder)
    image = pick_column(loaded.column_names, image_column, path, IMAGE_COLUMNS, "real_image_column")
    text = pick_column(loaded.column_names, caption_column, path, CAPTION_COLUMNS, "real_caption_column")
    captions = [str(c or "").strip() for c in loaded.with_format("arrow")[text].to_pylist()]
    fingerprint = getattr(loaded, "_fingerprint", "") or _stat_key(path)
    return ImageTable(
        [f"{path.resolve()}|{fingerprint}|{i}" for i in range(len(captions))],
        captions,
        lambda i: image_value(loaded[i][image]),
        folder,
    )


def read_image_table(spec: str, *, image_column: str | None = None, caption_column: str | None = None) -> ImageTable:
    """The (image, caption) items of ``data.real`` (see the module doc)."""
    path = Path(spec.partition(SPLIT_SEPARATOR)[0]).expanduser()
    if path.is_dir():
        if any((path / m).is_file() for m in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _dataset_table(spec, image_column, caption_column)
        found = next((path / name for name in CAPTION_FILES if (path / name).is_file()), None)
        if found is None:
            raise DataError(
                f"{path} holds no captions file ({', '.join(CAPTION_FILES)}); write one with a file_name "
                "and a caption per image"
            )
        return _folder_table(found, caption_column)
    if path.suffix in (".jsonl", ".csv") and path.is_file():
        return _folder_table(path, caption_column)
    if path.suffix == ".parquet" and path.is_file():
        return _parquet_table(path, image_column, caption_column)
    raise DataError(
        f"data.real={spec} is not an image source; give a folder with a captions file, a captions "
        ".jsonl/.csv, a .parquet file or a saved datasets folder"
    )


def _pil_or_source(value: Any) -> Any:
    return io.BytesIO(value) if isinstance(value, bytes) else value


class RealImageSource:
    """Keyed real latents and captions for SiDA (the trainer's ``real_source``), see the module doc.

    Args:
        table: the source's items.
        teacher: the loaded teacher (VAE posterior, prompt encoding, ``latent_shape``).
        resolution: image resolution of the run.
        cache_dir: root of the on-disk caches (latents under ``latents/``; captions' text embeddings
            in the prompt cache layout beside them); None keeps the latents in memory (small sets).
        batch_size: images per VAE call while encoding.
        cache_size: captions' text embeddings kept in memory.
    """

    def __init__(
        self,
        table: ImageTable,
        teacher: Any,
        *,
        resolution: int,
        cache_dir: str | Path | None,
        batch_size: int = 32,
        cache_size: int = 4096,
    ) -> None:
        self.table, self.teacher, self.resolution = table, teacher, int(resolution)
        self.batch_size = int(batch_size)
        self.channels = int(teacher.image_channels)
        settings = {
            "kind": "vae posterior (mean, std) in latent space",
            "vae": teacher.vae_settings(),
            "resolution": self.resolution,
            "channels": self.channels,
            "resize": "shorter side, PIL bicubic, centre crop",
        }
        root = Path(cache_dir) / "latents" if cache_dir is not None else None
        self._memory: dict[str, dict[str, Tensor]] = {}
        self.disk = DiskEmbeddingCache(root, settings) if root is not None else None
        self.skipped = 0
        self.valid: list[int] = []
        self.prompts: PromptSource | None = None
        self._cache_dir, self._cache_size = cache_dir, cache_size

    def __len__(self) -> int:
        return len(self.valid)

    def _has(self, key: str) -> bool:
        return key in self.disk if self.disk is not None else key in self._memory

    def precompute(self, *, share: tuple[int, int] | None = None) -> int:
        """Encode the latents of every image not yet cached (rank ``r`` of ``w``: the missing items
        ``[r::w]``), then index the readable items; returns how many were skipped as unreadable.
        Every rank of a process group must call it."""
        import torch.distributed as dist

        rank, world = share or ((dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1))
        barrier()
        missing = [i for i in range(len(self.table)) if not self._has(self.table.keys[i])]
        if self.disk is not None:
            self.disk.rank = rank
        bad = 0
        for chunk in _chunks(missing[rank::world], self.batch_size):
            images, ok = [], []
            for i in chunk:
                try:
                    images.append(load_image(_pil_or_source(self.table.read(i)), self.resolution, self.channels))
                    ok.append(i)
                except (OSError, ValueError, SyntaxError, TypeError):  # PIL's errors: unreadable, corrupt
                    bad += 1
            if ok:
                mean, std = self.teacher.encode_posterior(torch.stack(images))
                rows = Cond({"mean": mean.cpu(), "std": std.cpu()})
                self._store([self.table.keys[i] for i in ok], rows)
        if self.disk is not None:
            self.disk.flush()
        barrier()
        if self.disk is not None and world > 1:
            self.disk.reload()
        self.valid = [i for i in range(len(self.table)) if self._has(self.table.keys[i])]
        self.skipped = len(self.table) - len(self.valid)
        if not self.valid:
            raise DataError(f"no readable images in {self.table.where}; check the image files and the captions file")
        captions = [self.table.captions[i] or "" for i in self.valid]
        self.prompts = PromptSource(captions, self.teacher, cache_size=self._cache_size, cache_dir=self._text_cache())
        return self.skipped

    def _text_cache(self) -> Path | None:
        return Path(self._cache_dir) if self._cache_dir is not None else None

    def _store(self, keys: Sequence[str], rows: Cond) -> None:
        if self.disk is not None:
            self.disk.add(keys, rows)
        else:
            for j, key in enumerate(keys):
                self._memory[key] = {name: rows[name][j : j + 1].clone() for name in rows.keys()}

    def _row(self, key: str) -> dict[str, Tensor]:
        row = self.disk.get(key) if self.disk is not None else self._memory.get(key)
        if row is None:
            raise DataError(f"the cached latent of {key.split('|')[0]} is gone; delete the cache folder and rerun")
        return row

    def sample(self, *, seed: int, iteration: int, stream: str, indices: Sequence[int]) -> tuple[Tensor, Cond]:
        """Real latents ``[b, C, h, w]`` and their captions' conditioning for global samples ``indices``."""
        if self.prompts is None:
            raise RuntimeError("RealImageSource.precompute() must run before sample()")
        picks = rng.randint_per_sample(len(self.valid), seed=seed, iteration=iteration, stream=stream, indices=indices)
        rows = [self._row(self.table.keys[self.valid[int(p)]]) for p in picks]
        mean, std = torch.cat([r["mean"] for r in rows]), torch.cat([r["std"] for r in rows])
        noise = rng.randn_per_sample(
            tuple(mean.shape[1:]), seed=seed, iteration=iteration, stream=f"{stream}/posterior", indices=indices
        )
        return mean + std * noise.to(mean.dtype), self.prompts.encode([self.prompts.prompts[int(p)] for p in picks])


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
