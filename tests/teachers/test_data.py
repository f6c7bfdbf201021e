"""Prompt CondSources: keyed prompt order, LRU and on-disk safetensors embedding caches."""

from __future__ import annotations

import pytest
import torch

from sidflow.core import rng
from sidflow.core.denoiser import Cond
from sidflow.data.prompts import EmbeddingCache, PromptSource, read_prompt_file
from sidflow.errors import DataError


class CountingEncoder:
    """Embeds a prompt as [len, first char code] (exactly recomputable), counting calls."""

    def __init__(self):
        self.calls, self.parked = [], None

    def encode_prompts(self, prompts):
        self.calls.append(list(prompts))
        rows = [[float(len(p)), float(ord(p[0])) if p else 0.0] for p in prompts]
        return Cond({"embeds": torch.tensor(rows).view(-1, 1, 2), "mask": torch.ones(len(prompts), 1).long()})

    def uncond(self, n):
        return self.encode_prompts([""]).repeat(n)

    def encoder_settings(self):
        return {"kind": "counting"}

    def move_text_encoders(self, device):
        self.parked = device


PROMPTS = ["a cat", "bb dog", "ccc house", "dddd tree"]


def test_keyed_prompt_order_independent_of_batching():
    src = PromptSource(PROMPTS, CountingEncoder())
    whole = src.sample(seed=3, iteration=5, stream="gen", indices=[0, 1, 2, 3])
    halves = [src.sample(seed=3, iteration=5, stream="gen", indices=idx) for idx in ([0, 1], [2, 3])]
    torch.testing.assert_close(whole["embeds"], Cond.cat(halves)["embeds"])
    picks = rng.randint_per_sample(4, seed=3, iteration=5, stream="gen", indices=[0, 1, 2, 3])
    expected = torch.tensor([[len(PROMPTS[i]), ord(PROMPTS[i][0])] for i in picks], dtype=torch.float32)
    torch.testing.assert_close(whole["embeds"][:, 0], expected)
    assert whole["mask"].dtype == torch.long


def test_lru_evicts_least_recently_used():
    cache = EmbeddingCache(2)
    cache.put("a", {"x": torch.zeros(1)})
    cache.put("b", {"x": torch.ones(1)})
    assert cache.get("a") is not None
    cache.put("c", {"x": torch.ones(1)})
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2


def test_memory_cache_avoids_reencoding_and_offloads_when_complete():
    enc = CountingEncoder()
    src = PromptSource(PROMPTS, enc, cache_size=8)
    assert src.precompute(offload=True)
    assert enc.parked == "cpu"
    calls = len(enc.calls)
    src.sample(seed=0, iteration=1, stream="fake", indices=range(6))
    assert len(enc.calls) == calls


def test_too_small_lru_is_not_fully_cached_and_keeps_encoders():
    enc = CountingEncoder()
    src = PromptSource(PROMPTS, enc, cache_size=2)
    assert not src.precompute(offload=True)
    assert enc.parked is None


def test_disk_cache_roundtrip_keyed_by_settings(tmp_path):
    enc = CountingEncoder()
    PromptSource(PROMPTS, enc, cache_size=0, cache_dir=tmp_path, batch_size=3).precompute()
    assert len(list(tmp_path.rglob("shard-*.safetensors"))) == 1  # both encoder batches in one shard
    enc2 = CountingEncoder()
    src = PromptSource(PROMPTS, enc2, cache_size=0, cache_dir=tmp_path)
    out = src.encode(["ccc house", "a cat"])
    assert enc2.calls == []
    torch.testing.assert_close(out["embeds"], enc.encode_prompts(["ccc house", "a cat"])["embeds"])
    assert src.fully_cached()
    enc3 = CountingEncoder()
    PromptSource(PROMPTS, enc3, cache_dir=tmp_path, settings={"kind": "other"}).encode(["a cat"])
    assert enc3.calls == [["a cat"]]


def test_no_cache_at_all_still_encodes():
    enc = CountingEncoder()
    source = PromptSource(["a", "bb"], enc, cache_size=0)  # no LRU and no cache_dir
    out = source.encode(["bb", "a", "bb"])
    assert len(out) == 3 and torch.equal(out["embeds"][0], out["embeds"][2])
    assert out["embeds"][1, 0].tolist() == [1.0, float(ord("a"))]
    assert source.memory.max_items == 0 and source.disk is None


def test_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  two dogs \n")
    assert read_prompt_file(path) == ["a cat", "two dogs"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="has no prompts") as err:
        PromptSource.from_file(tmp_path / "empty.txt", CountingEncoder())
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_teacher_embeddings_through_the_cache(tiny, tmp_path):
    from sidflow.teachers import load_teacher

    teacher = load_teacher(tiny("sana"))
    src = PromptSource(["a cat", "a dog"], teacher, cache_dir=tmp_path)
    out = src.encode(["a dog", "a cat"])
    direct = teacher.encode_prompts(["a dog", "a cat"])
    torch.testing.assert_close(out["prompt_embeds"], direct["prompt_embeds"])
    assert torch.equal(out["prompt_attention_mask"], direct["prompt_attention_mask"])
    again = PromptSource(["a cat", "a dog"], teacher, cache_dir=tmp_path, cache_size=0)
    torch.testing.assert_close(again.encode(["a cat"])["prompt_embeds"], direct["prompt_embeds"][1:])
    assert again.encoder_calls == 0


def test_parked_text_encoders_still_encode(tiny):
    from sidflow.teachers import load_teacher

    teacher = load_teacher(tiny("flux"))
    src = PromptSource(["a cat"], teacher)
    assert src.precompute(offload=True) and teacher.text_device == torch.device("cpu")
    fresh = teacher.encode_prompts(["a new prompt"])
    assert fresh.device == teacher.device and fresh["prompt_embeds"].shape[0] == 1
