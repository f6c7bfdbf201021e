"""The GPU benchmark stays runnable: a CPU smoke run of benchmarks/gpu_scale.py at tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "pure_bf16"])
def test_gpu_scale_smoke_runs_on_cpu(precision):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_scale.py"),
            "--tiny",
            "--device",
            "cpu",
            "--precision",
            precision,
            "--iterations",
            "1",
            "--resolution",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["precision"] == precision and result["images_per_s"] > 0 and result["tflops_per_iteration"] > 0
    assert result["loss_gen"] == result["loss_gen"]  # finite, not NaN


@pytest.mark.slow
def test_prompt_cache_benchmark_smoke_run():
    """benchmarks/prompt_cache.py at small sizes: it runs, prints both rows and holds its own bound."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "prompt_cache.py"), "--prompts", "200", "3000", "--lookups", "50"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["prompts"] for r in rows] == [200, 3000] and all(r["sample_ms"] > 0 for r in rows)
    assert "bound 200 MB: ok" in out.stdout
