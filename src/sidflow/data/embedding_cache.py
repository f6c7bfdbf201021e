"""On-disk and in-memory caches of per-prompt text embeddings, host memory bounded at any scale.

A prompt's embeddings are a "row" (``field -> [1, ...]`` tensors, e.g. 2.4 MiB for SD3). The
:class:`EmbeddingCache` LRU keeps ``max_items`` rows in memory. The :class:`DiskEmbeddingCache`
keeps every row in sharded safetensors files under ``root/<settings hash>/``: the folder is keyed
by the encoder settings (teacher, text-encoder dtype, token length, CHI ...) and each row by a hash
of its prompt, so a changed setting never reads stale embeddings. Shards are written atomically
(tmp + rename) under unique names carrying the writer's rank, so ranks and runs never collide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sidflow.atomic import atomic_file
from sidflow.core.denoiser import Cond

__all__ = ["EmbeddingCache", "DiskEmbeddingCache", "Row", "settings_hash", "prompt_key", "SHARD_BYTES", "SHARD_ROWS"]

log = logging.getLogger(__name__)

Row = dict[str, Tensor]  # one prompt's tensors, each with a leading batch dim of 1
SHARD_BYTES = 256 * 2**20  # a shard's rows, buffered in host memory until written
SHARD_ROWS = 8192  # ... or this many rows, whichever comes first (small encoders: more, smaller files)
OPEN_SHARDS = 32  # shard files kept open (an LRU)
_KEYS = "_prompt_keys"  # each shard's [n, 24] uint8 tensor of hex prompt keys (row order)
_KEY = np.dtype("S24")  # a prompt key in memory: 24 ASCII hex bytes (never a trailing NUL)


def settings_hash(settings: dict) -> str:
    """Short stable hash of the encoder settings (JSON, sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def prompt_key(prompt: str) -> bytes:
    """A prompt's cache key: 24 hex digits of its BLAKE2b hash (ASCII bytes, as stored in shards)."""
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=12).hexdigest().encode()


class EmbeddingCache:
    """In-memory LRU of per-prompt tensors (``max_items`` prompts; 0 disables it)."""

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = int(max_items)
        self._rows: OrderedDict[str, Row] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, prompt: str) -> Row | None:
        row = self._rows.get(prompt)
        if row is not None:
            self._rows.move_to_end(prompt)
        return row

    def put(self, prompt: str, row: Row) -> None:
        if self.max_items <= 0:
            return
        self._rows[prompt] = row
        self._rows.move_to_end(prompt)
        while len(self._rows) > self.max_items:
            self._rows.popitem(last=False)


class DiskEmbeddingCache:
    """Sharded safetensors cache under ``root/<settings hash>/shard-r<rank>-<id>.safetensors``.

    Each shard stacks the rows of its prompts (``field -> [n, ...]``) next to a ``[n, 24]`` tensor
    of their keys. Rows are buffered in host memory up to ``shard_bytes`` or ``shard_rows`` (one
    shard, the only host memory that grows with the work) and then written atomically under a new
    unique name, so writers never collide. The index, rebuilt from the key tensors on
    :meth:`reload`, is two numpy arrays (sorted keys, packed ``shard << 32 | row``): 32 bytes a
    prompt, and a lookup is a binary search plus one read per tensor from an open shard file (an
    LRU of ``open_shards``, headers parsed once): its cost does not grow with the number of
    prompts. An unreadable shard is skipped with a warning: its prompts count as missing and are
    encoded again.
    """

    def __init__(
        self,
        root: str | Path,
        settings: dict,
        *,
        rank: int = 0,
        shard_bytes: int = SHARD_BYTES,
        shard_rows: int = SHARD_ROWS,
        open_shards: int = OPEN_SHARDS,
    ) -> None:
        self.dir = Path(root) / settings_hash(settings)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.dir / "settings.json") as tmp:  # every rank may write it at once
            tmp.write_text(json.dumps(settings, sort_keys=True, default=str) + "\n")
        self.rank = rank  # names the shards this process writes
        self.shard_bytes, self.shard_rows, self.open_shards = int(shard_bytes), int(shard_rows), int(open_shards)
        self.meta: dict = {}  # the encoder's Cond.meta, stored with every shard
        self._buffer: dict[str, Tensor] | None = None  # one shard's rows, allocated on first use
        self._capacity = 0  # rows of the buffer
        self._pending: dict[bytes, int] = {}  # key -> buffer row, for rows not yet written
        self._pending_keys: list[bytes] = []
        self.reload()

    def reload(self) -> None:
        """Rebuild the index from the shards on disk (e.g. once other ranks have written theirs)."""
        for open_shard in getattr(self, "_open", {}).values():
            open_shard.close()
        self._shards: list[Path] = []
        self._bad: set[int] = set()
        self._open: OrderedDict[int, _ShardFile] = OrderedDict()
        keys, locs = [np.empty(0, _KEY)], [np.empty(0, np.int64)]
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                with _ShardFile(path) as shard:
                    shard_keys = shard.keys()
            except Exception as err:  # a truncated or foreign file: re-encode rather than crash
                log.warning("prompt cache: skipping unreadable shard %s (%s); its prompts are encoded again", path, err)
                continue
            keys.append(shard_keys)
            locs.append(_locations(len(self._shards), len(shard_keys)))
            self._shards.append(path)
            self.meta = shard.meta or self.meta
        self._set_index(np.concatenate(keys), np.concatenate(locs))

    def _set_index(self, keys: np.ndarray, locs: np.ndarray) -> None:
        self._keys, first = np.unique(keys, return_index=True)  # sorted; a duplicate keeps its first row
        self._locs = locs[first]

    def __len__(self) -> int:
        return len(self._keys) + len(self._pending)

    def __contains__(self, prompt: str) -> bool:
        key = prompt_key(prompt)
        return key in self._pending or self._locate(key) is not None

    def _locate(self, key: bytes) -> tuple[int, int] | None:
        i = int(np.searchsorted(self._keys, key))
        if i < len(self._keys) and self._keys[i] == key:
            shard, row = divmod(int(self._locs[i]), 1 << 32)
            if shard not in self._bad:
                return shard, row
        return None

    def _shard(self, shard: int) -> _ShardFile:
        if shard not in self._open:
            self._open[shard] = _ShardFile(self._shards[shard])  # the header is parsed once here
            while len(self._open) > self.open_shards:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(shard)
        return self._open[shard]

    def get(self, prompt: str) -> Row | None:
        """The prompt's row (fresh CPU tensors), or None when it is not cached."""
        key = prompt_key(prompt)
        if key in self._pending:
            assert self._buffer is not None
            pos = self._pending[key]
            return {name: buf[pos : pos + 1].clone() for name, buf in self._buffer.items()}
        hit = self._locate(key)
        if hit is None:
            return None
        shard, row = hit
        try:
            return self._shard(shard).row(row)
        except Exception as err:
            log.warning(
                "prompt cache: shard %s is unreadable (%s); its prompts are encoded again", self._shards[shard], err
            )
            self._bad.add(shard)
            if shard in self._open:
                self._open.pop(shard).close()
            return None

    def add(self, prompts: Sequence[str], cond: Cond) -> None:
        """Buffer the rows of ``cond`` for ``prompts`` (one row each); a full buffer is written as a shard."""
        if len(cond) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(cond)} rows of embeddings")
        tensors = {name: cond[name].detach().cpu() for name in cond.keys()}
        self.meta = dict(cond.meta)
        start = 0
        while start < len(prompts):
            buffer = self._buffer if self._buffer is not None else self._allocate(tensors)
            if set(buffer) != set(tensors):
                raise ValueError(f"the encoder's fields changed from {sorted(buffer)} to {sorted(tensors)}")
            fill = len(self._pending_keys)
            take = min(self._capacity - fill, len(prompts) - start)
            for name, value in tensors.items():
                buffer[name][fill : fill + take] = value[start : start + take]
            for j, prompt in enumerate(prompts[start : start + take]):
                key = prompt_key(prompt)
                self._pending[key] = fill + j
                self._pending_keys.append(key)
            start += take
            if len(self._pending_keys) == self._capacity:
                self.flush(keep_buffer=True)

    def _allocate(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        row_bytes = sum(t[0].numel() * t.element_size() for t in tensors.values())
        self._capacity = max(1, min(self.shard_rows, self.shard_bytes // max(row_bytes, 1)))
        self._buffer = {name: torch.empty((self._capacity, *t.shape[1:]), dtype=t.dtype) for name, t in tensors.items()}
        return self._buffer

    def flush(self, keep_buffer: bool = False) -> None:
        """Write the buffered rows as one new shard (atomically) and index them; free the buffer."""
        from safetensors.torch import save_file

        if self._pending_keys:
            assert self._buffer is not None
            n = len(self._pending_keys)
            keys = np.array(self._pending_keys, dtype=_KEY)
            tensors = {name: buf[:n] for name, buf in self._buffer.items()}
            tensors[_KEYS] = torch.from_numpy(keys.view(np.uint8).reshape(n, _KEY.itemsize))
            path = self.dir / f"shard-r{self.rank:03d}-{uuid.uuid4().hex[:16]}.safetensors"
            with atomic_file(path) as tmp:
                save_file(tensors, str(tmp), metadata={"meta": json.dumps(self.meta)})
            self._set_index(
                np.concatenate([self._keys, keys]), np.concatenate([self._locs, _locations(len(self._shards), n)])
            )
            self._shards.append(path)
            self._pending.clear()
            self._pending_keys.clear()
        if not keep_buffer:
            self._buffer = None


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _ShardFile:
    """One open shard: its safetensors header parsed once, a row read with one ``pread`` per tensor.

    Not ``safe_open``: its memory map would count every page a lookup touches (and the kernel's
    read-around) in the process's resident set, up to the whole cache (+130 MB after 16k random
    lookups in a 130 MB cache, ``benchmarks/prompt_cache.py``); a read leaves them in the page cache.
    """

    def __init__(self, path: Path) -> None:
        self.file = path.open("rb", buffering=0)
        try:
            (size,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(size))
            metadata = header.pop("__metadata__", None) or {}
            self.meta = json.loads(metadata.get("meta", "{}"))
            base, end = 8 + size, max((info["data_offsets"][1] for info in header.values()), default=0)
            if os.fstat(self.file.fileno()).st_size != base + end:
                raise ValueError("the file size does not match its header (truncated?)")
            # the first format listed the keys as JSON in the header
            self._old_keys = json.loads(metadata["keys"]) if "keys" in metadata else None
            self.rows = header[_KEYS]["shape"][0] if _KEYS in header else len(self._old_keys or [])
            self.fields: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # dtype, row shape, offset, bytes
            for name, info in header.items():
                dtype, (rows, *shape) = _DTYPES[info["dtype"]], info["shape"]
                if rows != self.rows:
                    raise ValueError(f"{name} has a different number of rows than keys")
                self.fields[name] = (dtype, shape, base + info["data_offsets"][0], math.prod(shape) * dtype.itemsize)
        except Exception:
            self.file.close()
            raise

    def __enter__(self) -> _ShardFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def _read(self, name: str, start: int, count: int) -> Tensor:
        dtype, shape, offset, row_bytes = self.fields[name]
        data = os.pread(self.file.fileno(), count * row_bytes, offset + start * row_bytes)
        if len(data) != count * row_bytes:
            raise ValueError(f"short read of {name}")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(count, *shape)

    def keys(self) -> np.ndarray:
        """The prompt keys, in row order."""
        if _KEYS in self.fields:
            return self._read(_KEYS, 0, self.rows).numpy().view(_KEY).reshape(-1)
        if self._old_keys is None:
            raise ValueError("no prompt keys")
        return np.array([key.encode() for key in self._old_keys], dtype=_KEY)

    def row(self, row: int) -> Row:
        """Row ``row`` of every tensor, shape ``[1, ...]`` (fresh tensors)."""
        return {name: self._read(name, row, 1) for name in self.fields if name != _KEYS}


def _locations(shard: int, rows: int) -> np.ndarray:
    return (np.int64(shard) << 32) | np.arange(rows, dtype=np.int64)
