"""Prompt-embedding cache at scale (issue 13): host memory and lookup time against the number of prompts.

Each size runs in its own process, so each peak RSS (``ru_maxrss``) is that size's alone: N
synthetic prompts go through :meth:`sidflow.data.prompts.PromptSource.precompute` into an on-disk
cache, encoded by a real text encoder at toy size (a random ``transformers.CLIPTextModel``, hidden
32, 2 layers, 16 tokens, built from a config offline, fed byte-level token ids), then random
``source.sample`` calls (keyed draws, as in training) and random ``source.encode`` lookups are
timed (best of 3 passes) with the in-memory LRU off (``cache_size=0``), so every lookup reads a
shard. A second source then reopens the cache (it must encode nothing). Printed: the table, then
the peak-RSS growth from the smallest to the largest size (must stay under 200 MB: host memory is
bounded by one shard, not by the prompts' embeddings) and the lookup-time ratio (should stay near 1).

    python benchmarks/prompt_cache.py [--prompts 1000 200000] [--lookups 2000] [--batch 8]

About 30 s for 200,000 prompts on 2 CPU cores; ``--prompts 200 2000 --lookups 100`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sidflow.core.denoiser import Cond
from sidflow.data.prompts import PromptSource

TOKENS = 16  # CLIP positions; prompts are cut to TOKENS - 2 bytes
BOS, EOS, PAD = 256, 257, 258
ADJECTIVES = ["red", "small", "ancient", "glowing", "wooden", "misty", "striped", "golden"]
NOUNS = ["fox", "lighthouse", "teapot", "robot", "forest", "violin", "castle", "bicycle"]
GROWTH_BOUND_MB = 200.0
ROUNDS = 3  # timed passes over the same lookups


class TinyClipEncoder:
    """A :class:`~sidflow.core.denoiser.PromptEncoder`: a random CLIPTextModel over byte ids.

    Outputs per prompt ``prompt_embeds`` [16, 32] and ``pooled_prompt_embeds`` [32] (float32,
    2,176 bytes a prompt), the same kinds of tensors as a real teacher's, a thousand times smaller.
    """

    def __init__(self, seed: int = 0) -> None:
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(seed)
        config = CLIPTextConfig(
            vocab_size=PAD + 1,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TOKENS,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
        self.model = CLIPTextModel(config).eval()
        self.seed = seed

    def _ids(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            body = list(prompt.encode("utf-8")[: TOKENS - 2])
            rows.append([BOS, *body, EOS] + [PAD] * (TOKENS - 2 - len(body)))
        return torch.tensor(rows)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        out = self.model(input_ids=self._ids(list(prompts)))
        return Cond({"prompt_embeds": out.last_hidden_state, "pooled_prompt_embeds": out.pooler_output})

    def uncond(self, batch_size: int) -> Cond:
        return self.encode_prompts([""]).repeat(batch_size)

    def encoder_settings(self) -> dict:
        return {"encoder": "benchmark-tiny-clip", "seed": self.seed, "tokens": TOKENS}


def _prompts(n: int) -> list[str]:
    """``n`` distinct prompts (the number makes each unique)."""
    return [f"{i} a {ADJECTIVES[i % 8]} {NOUNS[i // 8 % 8]} at dusk" for i in range(n)]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # Linux: KiB


def worker(n: int, cache_dir: Path, lookups: int, batch: int) -> dict:
    """One size, in this process: precompute, timed random lookups, reopen."""
    torch.set_num_threads(1)
    encoder = TinyClipEncoder()
    prompts = _prompts(n)
    setup_mb = _peak_mb()
    start = time.perf_counter()
    source = PromptSource(prompts, encoder, cache_size=0, cache_dir=cache_dir)
    assert source.precompute() and source.disk is not None
    precompute_s = time.perf_counter() - start
    # best of `ROUNDS` (timeit's rule): the just-written shards are still being flushed to disk
    sample_ms = lookup_us = float("inf")
    picks = random.Random(0).choices(prompts, k=lookups * batch)
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for iteration in range(lookups):
            source.sample(seed=0, iteration=iteration, stream="bench", indices=range(batch))
        sample_ms = min(sample_ms, (time.perf_counter() - start) / lookups * 1e3)
        start = time.perf_counter()
        for i in range(lookups):
            source.encode(picks[i * batch : (i + 1) * batch])
        lookup_us = min(lookup_us, (time.perf_counter() - start) / (lookups * batch) * 1e6)
    start = time.perf_counter()
    again = PromptSource(prompts, encoder, cache_size=0, cache_dir=cache_dir)
    assert again.precompute() and again.encoder_calls == 0, "the reopened cache encoded prompts again"
    reopen_s = time.perf_counter() - start
    shards = sorted(source.disk.dir.glob("shard-*.safetensors"))
    return {
        "prompts": n,
        "encoder_calls": source.encoder_calls,
        "precompute_s": round(precompute_s, 1),
        "shards": len(shards),
        "disk_mb": round(sum(p.stat().st_size for p in shards) / 1e6, 1),
        "setup_peak_mb": round(setup_mb, 1),
        "peak_mb": round(_peak_mb(), 1),
        "reopen_s": round(reopen_s, 2),
        "sample_ms": round(sample_ms, 3),
        "lookup_us": round(lookup_us, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1000, 200_000], help="sizes, one process each")
    parser.add_argument("--lookups", type=int, default=2000, help="timed sample() calls per size")
    parser.add_argument("--batch", type=int, default=8, help="prompts per sample() call")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run one size in this cache dir
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.prompts[0], args.worker, args.lookups, args.batch)))
        return 0
    rows = []
    for n in sorted(args.prompts):
        with tempfile.TemporaryDirectory(prefix="sidflow-prompt-cache-") as tmp:
            cmd = [sys.executable, __file__, "--worker", tmp, "--prompts", str(n)]
            cmd += ["--lookups", str(args.lookups), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    columns = list(rows[0])
    print("\n" + " | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    small, large = rows[0], rows[-1]
    growth = large["peak_mb"] - small["peak_mb"]
    verdict = "ok" if growth < GROWTH_BOUND_MB else "OVER THE BOUND"
    print(
        f"\npeak RSS growth {small['prompts']} -> {large['prompts']} prompts: {growth:.1f} MB "
        f"(bound {GROWTH_BOUND_MB:.0f} MB: {verdict}); their embeddings: {large['disk_mb']:.1f} MB on disk"
    )
    print(
        f"lookup time ratio: sample() {large['sample_ms'] / small['sample_ms']:.2f}x, "
        f"encode() per prompt {large['lookup_us'] / small['lookup_us']:.2f}x"
    )
    return 0 if growth < GROWTH_BOUND_MB else 1  # over the bound: a failing exit status


if __name__ == "__main__":
    sys.exit(main())
