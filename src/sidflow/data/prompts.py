"""Prompt conditioning sources with cached text embeddings (spec 2.4, 8).

SiD is data-free: each iteration needs only prompts. :class:`PromptSource` implements the
:class:`~sidflow.core.denoiser.CondSource` contract: the prompt of global sample ``i`` at ``iteration``
for ``stream`` is ``prompts[randint_per_sample(len(prompts), seed, iteration, stream, i)]`` (keyed,
:mod:`sidflow.core.rng`), so it does not depend on the micro-batch size or the number of ranks.

Text encoders are the expensive part, so each prompt's embeddings are cached:

* in memory, an LRU of ``cache_size`` prompts (tensors kept on the CPU);
* optionally on disk, in sharded safetensors files under ``cache_dir/<settings hash>/``, keyed by
  the prompt and the encoder settings (teacher, text-encoder dtype, token length, CHI ...), so a
  changed setting never reads stale embeddings. Shards are written atomically (tmp + rename).

Once every prompt of the (finite) source is cached, :meth:`PromptSource.precompute` may park the
text encoders on the CPU (``offload=True``); they never leave the compute device otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from sidflow.atomic import atomic_file
from sidflow.core import rng
from sidflow.core.denoiser import Cond, PromptEncoder
from sidflow.errors import DataError

__all__ = ["PromptSource", "EmbeddingCache", "DiskEmbeddingCache", "read_prompt_file", "settings_hash"]

Row = dict[str, Tensor]  # one prompt's tensors, each with a leading batch dim of 1


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped); an empty file is a one-line :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def settings_hash(settings: dict) -> str:
    """Short stable hash of the encoder settings (JSON, sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _prompt_key(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=12).hexdigest()


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
    """Sharded safetensors cache under ``root/<settings hash>/shard-NNNNN.safetensors``.

    Each shard stacks the rows of the prompts it holds (``field -> [n, ...]``) and lists their
    prompt keys in its metadata; the index is rebuilt from the shards' headers on open.
    """

    def __init__(self, root: str | Path, settings: dict) -> None:
        from safetensors import safe_open

        self.dir = Path(root) / settings_hash(settings)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(json.dumps(settings, sort_keys=True, default=str) + "\n")
        self._index: dict[str, tuple[Path, int]] = {}
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            with safe_open(shard, framework="pt") as handle:
                keys = json.loads(handle.metadata()["keys"])
            self._index.update({key: (shard, row) for row, key in enumerate(keys)})

    def __contains__(self, prompt: str) -> bool:
        return _prompt_key(prompt) in self._index

    def get(self, prompt: str) -> Row | None:
        from safetensors import safe_open

        hit = self._index.get(_prompt_key(prompt))
        if hit is None:
            return None
        shard, row = hit
        with safe_open(shard, framework="pt") as handle:
            return {name: handle.get_slice(name)[row : row + 1] for name in handle.keys()}

    def put_many(self, prompts: Sequence[str], cond: Cond) -> None:
        """Write one new shard holding ``prompts`` (rows of ``cond``), atomically."""
        from safetensors.torch import save_file

        keys = [_prompt_key(p) for p in prompts]
        shard = self.dir / f"shard-{len(list(self.dir.glob('shard-*.safetensors'))):05d}.safetensors"
        tensors = {name: cond[name].detach().cpu().contiguous() for name in cond.keys()}
        with atomic_file(shard) as tmp:
            save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys)})
        self._index.update({key: (shard, row) for row, key in enumerate(keys)})


class PromptSource:
    """A finite list of prompts as a keyed :class:`~sidflow.core.denoiser.CondSource`.

    Args:
        prompts: the prompts (non-empty).
        encoder: a :class:`~sidflow.core.denoiser.PromptEncoder` (e.g. a loaded teacher).
        cache_size: prompts kept in the in-memory LRU.
        cache_dir: optional on-disk cache root (sharded safetensors).
        settings: encoder settings that key the disk cache (default: ``encoder.encoder_settings()``).
        batch_size: prompts per text-encoder call when encoding misses.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        encoder: PromptEncoder,
        *,
        cache_size: int = 4096,
        cache_dir: str | Path | None = None,
        settings: dict | None = None,
        batch_size: int = 32,
    ) -> None:
        self.prompts = [str(p) for p in prompts]
        if not self.prompts:
            raise DataError("the prompt list is empty; give at least one prompt")
        self.encoder = encoder
        self.memory = EmbeddingCache(cache_size)
        if settings is None:
            settings = encoder.encoder_settings() if hasattr(encoder, "encoder_settings") else {}
        self.disk = DiskEmbeddingCache(cache_dir, settings) if cache_dir is not None else None
        self.batch_size = int(batch_size)
        self.meta: dict = {}
        self._uncond: Cond | None = None
        self.encoder_calls = 0  # number of text-encoder batches run (for tests and logs)

    @classmethod
    def from_file(cls, path: str | Path, encoder: PromptEncoder, **kwargs) -> PromptSource:
        """Prompts from a text file, one per line."""
        return cls(read_prompt_file(path), encoder, **kwargs)

    def __len__(self) -> int:
        return len(self.prompts)

    def _encode_missing(self, prompts: list[str]) -> None:
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            cond = self.encoder.encode_prompts(chunk)
            self.encoder_calls += 1
            self.meta = dict(cond.meta)
            if self.disk is not None:
                self.disk.put_many(chunk, cond)
            for j, prompt in enumerate(chunk):
                self.memory.put(prompt, {k: v[j : j + 1].detach().cpu() for k, v in cond.tensors.items()})

    def _row(self, prompt: str) -> Row:
        row = self.memory.get(prompt)
        if row is None and self.disk is not None:
            row = self.disk.get(prompt)
            if row is not None:
                self.memory.put(prompt, row)
        if row is None:
            if self.memory.max_items <= 0 and self.disk is None:  # no cache at all: encode every time
                cond = self.encoder.encode_prompts([prompt])
                self.encoder_calls += 1
                self.meta = dict(cond.meta)
                return {k: v.detach().cpu() for k, v in cond.tensors.items()}
            self._encode_missing([prompt])
            # max_items <= 0 here implies a disk cache (the no-cache case returned above)
            row = (
                self.memory.get(prompt)
                if self.memory.max_items > 0
                else cast(DiskEmbeddingCache, self.disk).get(prompt)
            )
        assert row is not None
        return row

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Cached encoding of ``prompts`` (misses are encoded in batches, then cached)."""
        missing = [
            p
            for p in dict.fromkeys(prompts)
            if self.memory.get(p) is None and (self.disk is None or p not in self.disk)
        ]
        if missing and (self.memory.max_items >= len(missing) or self.disk is not None):
            self._encode_missing(missing)
        rows = [self._row(p) for p in prompts]
        return Cond({k: torch.cat([r[k] for r in rows]) for k in rows[0]}, dict(self.meta))

    def fully_cached(self) -> bool:
        """Every prompt is on disk, or all fit and sit in the in-memory LRU."""
        if self.disk is not None and all(p in self.disk for p in self.prompts):
            return True
        unique = set(self.prompts)
        return len(unique) <= self.memory.max_items and all(self.memory.get(p) is not None for p in unique)

    def precompute(self, offload: bool = False) -> bool:
        """Encode every prompt (and ``""``) into the caches; optionally park the text encoders.

        Returns:
            True when the source is fully cached (the only case in which encoders are offloaded).
        """
        self.encode(list(dict.fromkeys(self.prompts)))
        self._uncond = self.encoder.uncond(1)
        done = self.fully_cached()
        if done and offload and hasattr(self.encoder, "move_text_encoders"):
            self.encoder.move_text_encoders("cpu")
        return done

    def sample(self, *, seed: int, iteration: int, stream: str, indices: Sequence[int]) -> Cond:
        """Keyed prompt choice for each global sample index, encoded (batch ``len(indices)``)."""
        picks = rng.randint_per_sample(
            len(self.prompts), seed=seed, iteration=iteration, stream=stream, indices=indices
        )
        return self.encode([self.prompts[int(i)] for i in picks])

    def uncond(self, batch_size: int) -> Cond:
        """The encoder's unconditional conditioning (computed once), tiled to ``batch_size``."""
        if self._uncond is None:
            self._uncond = self.encoder.uncond(1)
        return self._uncond.repeat(batch_size)
