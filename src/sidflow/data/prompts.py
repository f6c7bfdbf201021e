"""Prompt conditioning sources with cached text embeddings (spec 2.4, 8).

SiD is data-free: each iteration needs only prompts. :class:`PromptSource` implements the
:class:`~sidflow.core.denoiser.CondSource` contract: the prompt of global sample ``i`` at ``iteration``
for ``stream`` is ``prompts[randint_per_sample(len(prompts), seed, iteration, stream, i)]`` (keyed,
:mod:`sidflow.core.rng`), so it does not depend on the micro-batch size or the number of ranks.

Text encoders are the expensive part, so each prompt's embeddings are cached:

* in memory, an LRU of ``cache_size`` prompts (tensors kept on the CPU);
* optionally on disk, in sharded safetensors files under ``cache_dir/<settings hash>/``, keyed by
  the prompt and the encoder settings (:mod:`sidflow.data.embedding_cache`).

Host memory stays bounded whatever the number of prompts (an SD3 prompt is 2.4 MiB of embeddings,
so 100k prompts would be 240 GB): :meth:`PromptSource.precompute` encodes the missing prompts one
batch at a time straight into the disk cache, which holds at most one shard's rows in memory; a
lookup reads one row of one shard. Under ``torch.distributed`` each rank encodes a disjoint share
of the missing prompts into shards named with its rank. Once every prompt is
cached, ``precompute(offload=True)`` parks the text encoders on the CPU; they never leave the
compute device otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sidflow.collectives import barrier, is_distributed
from sidflow.core import rng
from sidflow.core.denoiser import Cond, PromptEncoder
from sidflow.data.embedding_cache import DiskEmbeddingCache, EmbeddingCache, Row, settings_hash
from sidflow.data.prompt_files import read_prompt_file, read_prompts
from sidflow.errors import DataError

# the caches and readers are re-exported: they were defined here first
__all__ = ["PromptSource", "EmbeddingCache", "DiskEmbeddingCache", "read_prompts", "read_prompt_file", "settings_hash"]


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(total: int, rank: int) -> Any:
    from tqdm.auto import tqdm

    # rank 0 only; None: shown on a terminal, not in a redirected log
    return tqdm(total=total, desc="encoding prompts", unit="prompt", disable=True if rank != 0 else None)


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
        self.meta: dict = dict(self.disk.meta) if self.disk is not None else {}
        self._uncond: Cond | None = None
        self.encoder_calls = 0  # number of text-encoder batches run (for tests and logs)

    @classmethod
    def from_file(
        cls, path: str | Path, encoder: PromptEncoder, *, column: str | None = None, **kwargs
    ) -> PromptSource:
        """Prompts from a file or a saved dataset (:func:`~sidflow.data.prompt_files.read_prompts`)."""
        return cls(read_prompts(path, column), encoder, **kwargs)

    def __len__(self) -> int:
        return len(self.prompts)

    def _encode_batch(self, prompts: Sequence[str]) -> Cond:
        """One text-encoder call, brought to the host in one copy per tensor."""
        cond = self.encoder.encode_prompts(list(prompts))
        self.encoder_calls += 1
        self.meta = dict(cond.meta)
        return Cond({k: v.detach().cpu() for k, v in cond.tensors.items()}, self.meta)

    def _cached_row(self, prompt: str) -> Row | None:
        row = self.memory.get(prompt)
        if row is None and self.disk is not None:
            row = self.disk.get(prompt)
            if row is not None:
                self.memory.put(prompt, row)
        return row

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Cached encoding of ``prompts`` (misses are encoded in batches, then cached)."""
        rows: dict[str, Row] = {}
        missing = []
        for prompt in dict.fromkeys(prompts):
            row = self._cached_row(prompt)
            if row is None:
                missing.append(prompt)
            else:
                rows[prompt] = row
        for chunk in _batches(missing, self.batch_size):
            cond = self._encode_batch(chunk)
            for j, prompt in enumerate(chunk):
                # a copy: a view would keep the whole batch's storage alive in the LRU
                rows[prompt] = {k: v[j : j + 1].clone() for k, v in cond.tensors.items()}
                self.memory.put(prompt, rows[prompt])
            if self.disk is not None:
                self.disk.add(chunk, cond)
        if missing and self.disk is not None:
            self.disk.flush()
        first = rows[prompts[0]]
        return Cond({k: torch.cat([rows[p][k] for p in prompts]) for k in first}, dict(self.meta))

    def fully_cached(self) -> bool:
        """Every prompt is on disk, or all fit and sit in the in-memory LRU."""
        unique = dict.fromkeys(self.prompts)
        if self.disk is not None and all(p in self.disk for p in unique):
            return True
        return len(unique) <= self.memory.max_items and all(self.memory.get(p) is not None for p in unique)

    def precompute(self, offload: bool = False, *, share: tuple[int, int] | None = None) -> bool:
        """Encode every prompt (and ``""``) into the caches; optionally park the text encoders.

        With a disk cache, rank ``r`` of ``w`` encodes the missing prompts ``[r::w]`` (in order of
        first appearance, the same list on every rank since all read the index before any writes)
        into shards named with its rank, one batch at a time; the ranks then meet at a barrier and
        re-read the index (so under ``torch.distributed`` every rank must call it). Without one,
        the in-memory LRU is filled only when every prompt fits (filling part of it would just
        churn under random draws).

        Args:
            offload: move the text encoders to the CPU when the source ends fully cached.
            share: ``(rank, world_size)``; default: this process's ``torch.distributed`` rank.

        Returns:
            True when the source is fully cached (the only case in which encoders are offloaded).
        """
        if share is not None:
            rank, world = share
        else:
            rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        if self.disk is not None:
            self._fill_disk(self.disk, rank, world)
        else:
            unique = list(dict.fromkeys(self.prompts))
            if len(unique) <= self.memory.max_items:
                missing = [p for p in unique if self.memory.get(p) is None]
                with _progress(len(missing), rank) as bar:
                    for chunk in _batches(missing, self.batch_size):
                        self.encode(chunk)
                        bar.update(len(chunk))
        self._uncond = self.encoder.uncond(1)
        done = self.fully_cached()
        if done and offload and hasattr(self.encoder, "move_text_encoders"):
            self.encoder.move_text_encoders("cpu")
        return done

    def _fill_disk(self, disk: DiskEmbeddingCache, rank: int, world: int) -> None:
        barrier()  # every rank has read the index before any rank writes, so all see the same misses
        missing = [p for p in dict.fromkeys(self.prompts) if p not in disk]
        disk.rank = rank
        # rank 0's bar counts its share times the world size: the ranks move in step
        with _progress(len(missing), rank) as bar:
            for chunk in _batches(missing[rank::world], self.batch_size):
                disk.add(chunk, self._encode_batch(chunk))
                bar.update(min(len(chunk) * world, bar.total - bar.n))
        disk.flush()
        barrier()
        if world > 1:
            disk.reload()  # the other ranks' shards
            self.meta = dict(disk.meta) or self.meta  # (a rank that encoded nothing learns it here)

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
