"""Prompt data at scale (issue 13): prompt tables and datasets, and a host-memory-bounded embedding cache.

Readers: text, JSONL, CSV, parquet and saved datasets folders, with the column rule and one-line
errors. Cache: precompute encodes only the misses, batch by batch, into multi-batch shards while
the LRU stays at ``cache_size``; a second source on the same folder encodes nothing; an unreadable
shard is skipped and its prompts encoded again; ranks encode disjoint shares (as ``(rank, world)``
arguments, and once through torchrun with gloo).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from helpers import torchrun  # noqa: I001  (tests/ on the path)

from sidflow.config import DataConfig
from sidflow.core.denoiser import Cond
from sidflow.data.prompts import DiskEmbeddingCache, EmbeddingCache, PromptSource, read_prompt_file, read_prompts
from sidflow.errors import ConfigError, DataError
from sidflow.run.registry import resolve_prompts


def _one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- readers


def test_text_file_and_the_old_import(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  two dogs \n")
    assert read_prompts(path) == read_prompt_file(path) == ["a cat", "two dogs"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="has no prompts") as err:
        read_prompts(str(tmp_path / "empty.txt"))
    _one_line_error(err)
    with pytest.raises(DataError, match="does not exist.*jsonl") as err:
        read_prompts(str(tmp_path / "nope.txt"))
    _one_line_error(err)
    with pytest.raises(DataError, match="applies to tables"):
        read_prompts(path, column="caption")


def test_jsonl_default_and_named_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": 1, "prompt": "a cat", "caption": "c1"}, {"id": 2, "prompt": " a dog ", "caption": "c2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_prompts(path) == ["a cat", "a dog"]  # no "text": "prompt" comes next
    assert read_prompts(path, column="caption") == ["c1", "c2"]
    with pytest.raises(DataError, match="no column 'title' \\(it has: id, prompt, caption\\)") as err:
        read_prompts(path, column="title")
    assert "set prompt_column (data.prompt_column" in _one_line_error(err)
    (tmp_path / "ids.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(DataError, match="'text' / 'prompt' / 'caption'.*it has: id"):
        read_prompts(tmp_path / "ids.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON") as err:
        read_prompts(tmp_path / "bad.jsonl")
    _one_line_error(err)
    (tmp_path / "holes.jsonl").write_text('{"text": "ok"}\n{"other": "x"}\n')
    with pytest.raises(DataError, match="holes.jsonl:2 has no 'text' key"):
        read_prompts(tmp_path / "holes.jsonl")
    (tmp_path / "lists.jsonl").write_text('{"text": ["a", "b"]}\n')
    with pytest.raises(DataError, match="record 0 holds a list"):
        read_prompts(tmp_path / "lists.jsonl")


def test_csv_columns_and_blank_rows(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows(
            [["url", "caption", "alt"], ["u1", "a cat, sitting", "x"], ["u2", "  ", "y"], ["u3", "b", "z"]]
        )
    assert read_prompts(path) == ["a cat, sitting", "b"]  # quoted comma kept, blank caption skipped
    assert read_prompts(path, column="alt") == ["x", "y", "z"]
    with pytest.raises(DataError, match="no column 'text' \\(it has: url, caption, alt\\)"):
        read_prompts(path, column="text")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv is empty"):
        read_prompts(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text\n")
    with pytest.raises(DataError, match="has no prompts"):
        read_prompts(tmp_path / "header.csv")


def test_parquet_reads_one_column(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a cat", None, "a dog"], "score": [1.0, 2.0, 3.0], "alt": ["x", "y", "z"]}), path)
    assert read_prompts(path) == ["a cat", "a dog"]  # a null prompt is a blank one
    assert read_prompts(str(path), column="alt") == ["x", "y", "z"]
    with pytest.raises(DataError, match="no column 'caption' \\(it has: text, score, alt\\)") as err:
        read_prompts(path, column="caption")
    _one_line_error(err)
    with pytest.raises(DataError, match="record 0 holds a float"):
        read_prompts(path, column="score")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_prompts(tmp_path / "junk.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=r"needs pyarrow; pip install 'sidflow\[data\]'") as err:
        read_prompts(path)
    _one_line_error(err)


def test_saved_datasets_folders_and_splits(tmp_path, monkeypatch):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"caption": ["c1", "c2"], "text": ["t1", "t2"]}).save_to_disk(str(single))
    assert read_prompts(single) == ["t1", "t2"]
    assert read_prompts(str(single), column="caption") == ["c1", "c2"]
    with pytest.raises(DataError, match="single dataset without splits"):
        read_prompts(f"{single}::train")
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"prompt": ["p1", "p2", "p3"]}),
        validation=datasets.Dataset.from_dict({"prompt": ["v1"]}),
    ).save_to_disk(str(splits))
    assert read_prompts(splits) == ["p1", "p2", "p3"]
    assert read_prompts(f"{splits}::validation") == ["v1"]
    with pytest.raises(DataError, match="no split 'test' \\(it has: train, validation\\); name one as") as err:
        read_prompts(f"{splits}::test")
    _one_line_error(err)
    with pytest.raises(DataError, match="no column 'text' \\(it has: prompt\\)"):
        read_prompts(splits, column="text")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is a folder but not a saved dataset"):
        read_prompts(tmp_path / "plain")
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(DataError, match="is not a datasets folder; drop it"):
        read_prompts(f"{tmp_path / 'p.txt'}::train")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"needs datasets; pip install 'sidflow\[data\]'"):
        read_prompts(single)


def test_resolve_prompts_passes_the_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "t", "long": "a long caption"}\n')
    assert DataConfig(prompts=str(path), prompt_column="long").prompt_column == "long"
    assert resolve_prompts(str(path)) == ["t"]
    assert resolve_prompts(str(path), "long") == ["a long caption"]
    with pytest.raises(ConfigError, match="applies to prompt tables, not builtin:digits"):
        resolve_prompts("builtin:digits", "long")


# ---------------------------------------------------------------- the embedding cache


def _embed(prompt: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return torch.randn(4, 8, generator=gen)


class StubEncoder:
    """A deterministic PromptEncoder: ``prompt_embeds`` [n, 4, 8] seeded by the prompt, a long mask."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode_prompts(self, prompts):
        self.calls.append(list(prompts))
        embeds = torch.stack([_embed(p) for p in prompts])
        return Cond({"prompt_embeds": embeds, "mask": torch.ones(len(prompts), 4, dtype=torch.long)}, {"g": 3.5})

    def uncond(self, n):
        return Cond({"prompt_embeds": _embed("")[None], "mask": torch.zeros(1, 4, dtype=torch.long)}).repeat(n)

    def encoder_settings(self):
        return {"kind": "stub"}

    def encoded(self) -> list[str]:
        return [p for call in self.calls for p in call]


PROMPTS = [f"prompt number {i}" for i in range(3000)]


def _shards(root: Path) -> list[Path]:
    return sorted(root.rglob("shard-*.safetensors"))


def test_precompute_3000_prompts_bounded_lru_and_misses_only(tmp_path, monkeypatch):
    sizes = []
    put = EmbeddingCache.put

    def spy(self, prompt, row):
        put(self, prompt, row)
        sizes.append(len(self))

    monkeypatch.setattr(EmbeddingCache, "put", spy)
    first = StubEncoder()
    assert PromptSource(PROMPTS[:1000], first, cache_size=16, cache_dir=tmp_path, batch_size=64).precompute()
    assert first.encoded() == PROMPTS[:1000]
    enc = StubEncoder()
    source = PromptSource(PROMPTS + PROMPTS[:10], enc, cache_size=16, cache_dir=tmp_path, batch_size=64)
    assert source.disk is not None
    source.disk.shard_rows = 500  # several shards, each larger than one encoder batch
    assert source.precompute()
    assert enc.encoded() == PROMPTS[1000:]  # only the misses, each once, in batches of at most 64
    assert max(len(call) for call in enc.calls) == 64 and source.disk._buffer is None
    assert len(_shards(tmp_path)) == 1 + 4 and len(source.disk) == 3000
    out = source.sample(seed=1, iteration=2, stream="gen", indices=range(40))
    assert len(out) == 40 and out.meta == {"g": 3.5}
    picked = torch.stack([_embed(PROMPTS[int(i)]) for i in source_picks(source, range(40))])
    torch.testing.assert_close(out["prompt_embeds"], picked, rtol=0, atol=0)
    assert max(sizes) == 16

    again = StubEncoder()
    fresh = PromptSource(PROMPTS, again, cache_size=16, cache_dir=tmp_path)
    assert fresh.precompute() and fresh.fully_cached() and again.calls == []
    assert fresh.meta == {"g": 3.5}  # the encoder's meta comes back from the shards
    torch.testing.assert_close(
        fresh.encode(PROMPTS[2990:])["prompt_embeds"], torch.stack([_embed(p) for p in PROMPTS[2990:]])
    )
    assert again.calls == [] and len(fresh.memory) == 10


def source_picks(source: PromptSource, indices) -> list[int]:
    from sidflow.core import rng

    return rng.randint_per_sample(len(source), seed=1, iteration=2, stream="gen", indices=indices).tolist()


def test_memory_only_precompute_fills_the_lru_only_when_all_fit():
    enc = StubEncoder()
    assert not PromptSource(PROMPTS[:100], enc, cache_size=16).precompute()
    assert enc.calls == []  # filling part of the LRU would only churn under random draws
    source = PromptSource(PROMPTS[:100], enc, cache_size=100, batch_size=32)
    assert source.precompute() and [len(c) for c in enc.calls] == [32, 32, 32, 4]


def test_unreadable_shards_are_skipped_and_reencoded(tmp_path, caplog):
    PromptSource(PROMPTS[:300], StubEncoder(), cache_dir=tmp_path, batch_size=50).precompute()
    (old,) = _shards(tmp_path)
    PromptSource(PROMPTS[300:400], StubEncoder(), cache_dir=tmp_path).precompute()
    (new,) = set(_shards(tmp_path)) - {old}
    data = new.read_bytes()
    new.write_bytes(data[: len(data) // 2])  # truncated by a crash of something other than us
    enc = StubEncoder()
    with caplog.at_level(logging.WARNING, logger="sidflow.data.prompts"):
        source = PromptSource(PROMPTS[:400], enc, cache_dir=tmp_path)
    assert "skipping unreadable shard" in caplog.text and new.name in caplog.text
    assert source.precompute() and enc.encoded() == PROMPTS[300:400]

    reader = PromptSource(PROMPTS[:400], StubEncoder(), cache_dir=tmp_path, cache_size=0)
    old.write_bytes(b"garbage")  # broken after the index was read: found at lookup time
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidflow.data.prompts"):
        out = reader.encode(PROMPTS[:3])
    assert "is unreadable" in caplog.text and reader.encoder_calls == 1
    torch.testing.assert_close(out["prompt_embeds"], torch.stack([_embed(p) for p in PROMPTS[:3]]))


def test_ranks_encode_disjoint_shares(tmp_path):
    prompts = PROMPTS[:250] + PROMPTS[:50]  # repeats are encoded once
    PromptSource(prompts[:20], StubEncoder(), cache_dir=tmp_path).precompute()  # already cached: nobody
    encoders = [StubEncoder(), StubEncoder()]
    # both read the index before either writes (the barrier in precompute under torch.distributed)
    ranks = [PromptSource(prompts, enc, cache_dir=tmp_path, batch_size=16) for enc in encoders]
    done = [src.precompute(share=(r, 2)) for r, src in enumerate(ranks)]
    assert done == [False, True]  # rank 0 re-read the index before rank 1 wrote (no barrier here)
    shares = [enc.encoded() for enc in encoders]
    assert shares == [PROMPTS[20:250][0::2], PROMPTS[20:250][1::2]]
    names = [p.name for p in _shards(tmp_path)]
    assert sum("shard-r000-" in n for n in names) == 2 and sum("shard-r001-" in n for n in names) == 1
    ranks[0].disk.reload()
    assert ranks[0].fully_cached()
    fresh = StubEncoder()
    assert PromptSource(prompts, fresh, cache_dir=tmp_path).precompute() and fresh.calls == []


def test_first_format_shards_still_read(tmp_path):
    from safetensors.torch import save_file

    from sidflow.data.embedding_cache import prompt_key, settings_hash

    folder = tmp_path / settings_hash({"kind": "stub"})
    folder.mkdir()
    keys = [prompt_key(p).decode() for p in PROMPTS[:3]]
    tensors = {"prompt_embeds": torch.stack([_embed(p) for p in PROMPTS[:3]]), "mask": torch.ones(3, 4).long()}
    save_file(tensors, str(folder / "shard-00000.safetensors"), metadata={"keys": json.dumps(keys)})
    enc = StubEncoder()
    out = PromptSource(PROMPTS[:3], enc, cache_dir=tmp_path).encode([PROMPTS[2], PROMPTS[0]])
    assert enc.calls == [] and torch.equal(out["prompt_embeds"][0], _embed(PROMPTS[2]))


def test_lookups_keep_a_bounded_set_of_open_shards(tmp_path):
    source = PromptSource(PROMPTS[:200], StubEncoder(), cache_dir=tmp_path, cache_size=0)
    assert source.disk is not None
    source.disk.shard_rows = 10
    source.precompute()
    disk = DiskEmbeddingCache(tmp_path, {"kind": "stub"}, open_shards=3)
    assert len(disk._shards) == 20
    for p in PROMPTS[:200:7]:
        torch.testing.assert_close(disk.get(p)["prompt_embeds"][0], _embed(p))
        assert len(disk._open) <= 3
    assert disk.get("never cached") is None


_WORKER = textwrap.dedent("""
    import sys, torch
    from sidflow.run.distributed import init_from_env, shutdown
    sys.path.insert(0, sys.argv[2])
    from test_prompt_data import PROMPTS, StubEncoder
    from sidflow.data.prompts import PromptSource

    torch.set_num_threads(1)
    ctx = init_from_env()
    enc = StubEncoder()
    source = PromptSource(PROMPTS[:200], enc, cache_dir=sys.argv[1], batch_size=8)
    assert source.precompute()  # rank and world from the process group
    with open(f"{sys.argv[1]}/encoded-{ctx.rank}.txt", "w") as out:
        out.write("\\n".join(enc.encoded()))
    shutdown(ctx)
""")


@pytest.mark.slow
def test_two_gloo_ranks_share_the_encoding(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    torchrun([str(script), str(tmp_path), str(Path(__file__).parent)], timeout=300)
    shares = [(tmp_path / f"encoded-{r}.txt").read_text().splitlines() for r in range(2)]
    assert shares == [PROMPTS[:200][0::2], PROMPTS[:200][1::2]]
    assert {p.name[:11] for p in _shards(tmp_path)} == {"shard-r000-", "shard-r001-"}
