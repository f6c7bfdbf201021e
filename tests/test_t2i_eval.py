"""Real-teacher evaluation (``eval.kind=t2i`` and ``sidflow eval``) with tiny random DINOv2 and CLIP
models built offline: in the loop of a tiny SD3 run with snapshot selection on validation prompts;
on a digits run through the CLI, its reference features cached and reused; sharded over 2 gloo
ranks with the figures of one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import torchrun  # noqa: I001  (tests/ on the path)

from sidflow import cli
from sidflow.collectives import gather_rows
from sidflow.data.images import iter_images
from sidflow.errors import ConfigError, DataError
from sidflow.eval.t2i import T2IEvaluation
from sidflow.testing import build_tiny_metric_models, tiny_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> list[str]:
    """``eval.*`` overrides naming tiny DINOv2 / CLIP (also standing in for PickScore) folders."""
    models = build_tiny_metric_models(tmp_path_factory.mktemp("metric_models"))
    return [
        f"eval.dino_model={models['dino']}",
        f"eval.clip_model={models['clip']}",
        f"eval.pickscore_model={models['clip']}",
        f"eval.pickscore_tokenizer={models['clip']}",
    ]


def _t2i_run_args(tmp_path: Path, metric_models: list[str]) -> list[str]:
    """``sidflow distill`` overrides of a short tiny-SD3 run evaluated in the loop by ``eval.kind=t2i``."""
    teacher = tiny_pipeline("sd3", tmp_path / "pipes")
    (tmp_path / "train.txt").write_text("a red cube\na blue ball\na green cone\n")
    (tmp_path / "report.txt").write_text("".join(f"a small {c} house\n" for c in ("red", "blue", "grey", "pink")))
    (tmp_path / "val.txt").write_text("".join(f"a tall {c} tree\n" for c in ("red", "blue", "grey")))
    return [
        "--preset",
        "sd3-medium-4step",
        f"teacher.path={teacher}",
        "teacher.time_scale=1000",
        f"data.prompts={tmp_path / 'train.txt'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.resolution=32",
        "train.total_kimg=none",
        "train.max_steps=4",
        "train.batch=2",
        "train.batch_gpu=1",
        "train.ema_halflife_kimg=0.01",
        "eval.kind=t2i",
        f"eval.prompts={tmp_path / 'report.txt'}",
        f"eval.val_prompts={tmp_path / 'val.txt'}",
        "eval.every_kimg=0.004",
        "eval.student_steps=1,2",
        "eval.teacher_steps=2",
        "eval.teacher_grid_steps=2",
        "eval.grid_size=2",
        "eval.batch=3",
        "eval.metrics=fd_dinov2,clip,pickscore",
        "eval.select=validation",
        *metric_models,
    ]


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory, metric_models) -> tuple[Path, list[str]]:
    tmp_path = tmp_path_factory.mktemp("t2i")
    args = _t2i_run_args(tmp_path, metric_models)
    run = tmp_path / "run"
    assert cli.main(["distill", "--run-dir", str(run), *args, f"eval.feature_cache={tmp_path / 'features'}"]) == 0
    return run, args


def test_a_tiny_sd3_run_evaluates_in_the_loop_and_keeps_its_validation_best(t2i_run):
    run, _ = t2i_run
    tmp_path = run.parent
    metrics = json.loads((run / "metrics.json").read_text())
    history = metrics["history"]
    assert [row["images_seen"] for row in history] == [0, 4, 8]  # before training, after 2 and 4 iterations
    for row in history:
        for k in (1, 2):
            assert row[f"fd_dinov2_{k}step"] >= 0 and row[f"val_fd_dinov2_{k}step"] >= 0
            assert 0 <= row[f"clip_{k}step"] <= 100 and "pickscore_1step" in row
    selected = metrics["selected"]
    best = min(history, key=lambda r: r["val_fd_dinov2_1step"] * r["val_fd_dinov2_2step"])
    assert selected["images_seen"] == best["images_seen"]  # chosen on the validation prompts only
    assert metrics["final"]["fd_dinov2_1step"] == best["fd_dinov2_1step"]
    assert (run / "selected").is_dir()
    assert set(metrics["teacher"]["t2i"]) >= {"steps", "guidance", "clip", "pickscore"}
    report = (run / "report.md").read_text()
    assert "FD-DINOv2" in report and "CLIP score" in report and "selected by" in report
    # the reference features were cached: 2 sets (reported, validation) x 3 rows (dino, clip, pickscore)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 6


@pytest.mark.parametrize("sharding", ["none", "fsdp2"])
def test_two_gloo_ranks_share_the_in_loop_evaluation_and_match_one_process(t2i_run, tmp_path, sharding):
    """Each rank generates and scores its chunks of both prompt sets (under FSDP2 from gathered
    copies of the generator and, for the reference, of the teacher); the figures equal one process's
    (its training too, up to float summation order)."""
    one, args = t2i_run
    two = tmp_path / "two"
    features = tmp_path / "features"  # a fresh cache: the 2 ranks compute the teacher reference themselves
    run_args = [*args, f"train.sharding={sharding}", f"eval.feature_cache={features}"]
    torchrun(["-m", "sidflow.cli", "distill", "--run-dir", str(two), *run_args])
    ours = json.loads((two / "metrics.json").read_text())["history"]
    theirs = json.loads((one / "metrics.json").read_text())["history"]
    assert [r["images_seen"] for r in ours] == [r["images_seen"] for r in theirs]
    # (float differences only: 1 thread per rank here against 2 threads in the test process)
    for mine, want, rel in zip(ours, theirs, (1e-4, 1e-3, 1e-3), strict=True):  # untrained: same weights
        figures = {k: v for k, v in want.items() if k.endswith("step") and not k.startswith("sec_")}
        assert {k: mine[k] for k in figures} == pytest.approx(figures, rel=rel, abs=1e-6)
    assert len(list(features.glob("*.safetensors"))) == 6


def test_eval_settings_fail_fast_with_one_line(tmp_path, metric_models):
    from sidflow.cli.distill import resolve_config

    config = resolve_config("sd3-medium-4step", ["eval.kind=t2i", "eval.select=validation", *metric_models])
    teacher = type("T", (), {})()
    with pytest.raises(ConfigError, match="needs eval.val_prompts"):
        T2IEvaluation(config, teacher, (16, 4, 4), "cpu", prompts=["a", "b"])
    with pytest.raises(ConfigError, match="disjoint"):
        T2IEvaluation(config, teacher, (16, 4, 4), "cpu", prompts=["a", "b"], val_prompts=["b", "c"])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("digits") / "run"
    common = [
        "train.max_steps=1",
        "train.batch=8",
        "train.batch_gpu=8",
        "eval.kind=none",
        "eval.select=final",
        "eval.grid_size=2",
    ]
    assert cli.main(["distill", "--run-dir", str(run), *common, "eval.teacher_grid_steps=2"]) == 0
    return run


def _eval_args(run: Path, cache: Path, models: list[str], out: Path) -> list[str]:
    overrides = ["eval.prompts=builtin:digits", "eval.num_samples=40", "eval.batch=8", "eval.teacher_steps=4"]
    overrides += ["eval.metrics=fd_dinov2,clip,fid", f"eval.feature_cache={cache}", *models]
    return [str(run), "--steps", "1,4", "--out", str(out), *overrides]


def test_sidflow_eval_on_the_digits_run_caches_reference_features(digits_run, tmp_path, metric_models, monkeypatch):
    cache = tmp_path / "features"
    assert cli.main(["eval", *_eval_args(digits_run, cache, metric_models, tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    figures = first["figures"]
    assert set(figures) >= {"fd_dinov2_1step", "fd_dinov2_4step", "clip_1step", "clip_4step"}
    assert "fid" in first["skipped"] and "sidflow[fid]" in first["skipped"]["fid"]  # no Inception here: skipped
    assert "fid_1step" not in figures
    cached = sorted(cache.glob("*.safetensors"))
    assert len(cached) == 2  # the teacher's DINOv2 features and CLIP scores of the 40 prompts

    # a second call reuses them: the teacher is never sampled again, and the figures are the same
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher reference was recomputed")

    monkeypatch.setattr(T2IEvaluation, "teacher_images", no_teacher)
    assert cli.main(["eval", *_eval_args(digits_run, cache, metric_models, tmp_path / "b.json")]) == 0
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["figures"] == pytest.approx(figures | {k: second["figures"][k] for k in figures if "sec_" in k})
    assert sorted(cache.glob("*.safetensors")) == cached


def test_sidflow_eval_on_two_gloo_ranks_equals_one_process(digits_run, tmp_path, metric_models):
    cache1, cache2 = tmp_path / "one", tmp_path / "two"
    assert cli.main(["eval", *_eval_args(digits_run, cache1, metric_models, tmp_path / "one.json")]) == 0
    torchrun(["-m", "sidflow.cli", "eval", *_eval_args(digits_run, cache2, metric_models, tmp_path / "two.json")])
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    same = {k: v for k, v in one["figures"].items() if not k.startswith("sec_")}
    assert {k: two["figures"][k] for k in same} == pytest.approx(same, rel=1e-6)
    assert two["teacher"]["t2i"] == pytest.approx(one["teacher"]["t2i"], rel=1e-6)
    assert len(list(cache2.glob("*.safetensors"))) == 2  # written once (by rank 0)


def test_gather_rows_in_one_process_orders_by_sample_index():
    rows = {"a": torch.tensor([[2.0], [0.0], [1.0]]), "b": torch.tensor([20.0, 0.0, 10.0])}
    out = gather_rows(rows, [2, 0, 1])
    assert out["a"].flatten().tolist() == [0.0, 1.0, 2.0] and out["b"].tolist() == [0.0, 10.0, 20.0]


def test_reference_images_are_read_in_batches_and_a_corrupt_one_is_counted(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (30, 50), (32, 32)]):
        Image.new("RGB", size, (60 * i, 100, 200)).save(folder / f"{i}.png")
    (folder / "3.jpg").write_bytes(b"not an image")
    skipped = [0]
    batches = list(iter_images(folder, 16, batch=2, skipped=skipped))
    assert [idx for idx, _ in batches] == [[0, 1], [2]] and skipped == [1]
    images = torch.cat([b for _, b in batches])
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    expected = torch.tensor([60 * 2, 100, 200]) / 127.5 - 1  # a flat colour survives resize and crop
    torch.testing.assert_close(images[2, :, 8, 8], expected, atol=1e-2, rtol=0)
    with pytest.raises(DataError, match="neither a folder"):
        list(iter_images(tmp_path / "missing.txt", 16, batch=2))


def test_sidflow_eval_of_the_exported_pipeline_equals_the_run_folder(digits_run, tmp_path, metric_models):
    """The exported generator_pipeline (step times and resolution from its sidflow_generator.json,
    the teacher it was distilled from) scores as the run folder's final weights do."""
    cache = tmp_path / "features"
    same_reference = "eval.teacher_guidance=1.25"  # one teacher guidance for both (an export carries none)
    run_args = _eval_args(digits_run, cache, metric_models, tmp_path / "run.json")
    assert cli.main(["eval", *run_args, same_reference]) == 0
    exported = _eval_args(digits_run / "generator_pipeline", cache, metric_models, tmp_path / "exported.json")
    assert cli.main(["eval", *exported, same_reference]) == 0
    run = json.loads((tmp_path / "run.json").read_text())["figures"]
    pipe = json.loads((tmp_path / "exported.json").read_text())["figures"]
    figures = {k: v for k, v in run.items() if not k.startswith("sec_")}
    assert {k: pipe[k] for k in figures} == pytest.approx(figures, rel=1e-6)


def test_sidflow_eval_against_real_images_in_a_folder(digits_run, tmp_path, metric_models, capsys):
    """A COCO-style reference: captions as the prompts, a folder of images as the reference set; an
    unreadable image is skipped and counted; a changed folder is a new cache entry."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = (torch.rand(28, 28, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(images / f"{i:03d}.png")
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    cache = tmp_path / "features"
    args = _eval_args(digits_run, cache, metric_models, tmp_path / "real.json")
    assert cli.main(["eval", *args, f"eval.reference={images}", "eval.metrics=fd_dinov2,clip"]) == 0
    out = json.loads((tmp_path / "real.json").read_text())
    assert out["figures"]["fd_dinov2_1step"] > 0 and out["teacher"] == {}  # no teacher reference was made
    assert "1 unreadable reference images" in capsys.readouterr().out
    assert len(list(cache.glob("*.safetensors"))) == 1  # the folder's DINOv2 features
    Image.fromarray(pixels, mode="L").save(images / "extra.png")
    assert cli.main(["eval", *args, f"eval.reference={images}", "eval.metrics=fd_dinov2,clip"]) == 0
    assert len(list(cache.glob("*.safetensors"))) == 2


_GATHER_WORKER = """
import sys, torch
from sidflow.collectives import gather_rows
from sidflow.run.distributed import init_from_env, shutdown

ctx = init_from_env()
# rank 0 holds samples 0-2 and 6-8, rank 1 holds 3-5 and 9 (chunks of 3 dealt in turn)
mine = [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]][ctx.rank]
rows = {"f": torch.tensor([[float(i), -float(i)] for i in mine]), "s": torch.tensor([10.0 * i for i in mine])}
out = gather_rows(rows, mine)
assert out["f"][:, 0].tolist() == [float(i) for i in range(10)], out["f"]
assert out["s"].tolist() == [10.0 * i for i in range(10)]
open(f"{sys.argv[1]}/ok-{ctx.rank}", "w").close()
shutdown(ctx)
"""


def test_gather_rows_on_two_gloo_ranks_restores_the_sample_order(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(_GATHER_WORKER)
    torchrun([str(script), str(tmp_path)], timeout=120)
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()
