"""Teacher settings of issue 15: text-encoder precision, hub revision/variant/token, rank 0 downloads first."""

from __future__ import annotations

import pytest
import torch

from sidflow.config import SiDConfig, TeacherConfig, to_json
from sidflow.errors import TeacherLoadError
from sidflow.teachers import load_teacher, teacher_load_options
from sidflow.teachers.hub import download_first, hub_options
from sidflow.testing import load_pipeline


def test_run_settings_reach_load_teacher(tiny, monkeypatch):
    import sidflow.teachers
    from sidflow.run.build import load_run_teacher

    monkeypatch.setenv("MY_HUB_TOKEN", "hf_secret")
    tc = TeacherConfig(
        path=str(tiny("sd3")), text_encoder_dtype="bfloat16", revision="v2", variant="fp16", token_env="MY_HUB_TOKEN"
    )
    config = SiDConfig(teacher=tc)
    assert "hf_secret" not in to_json(config)  # only the variable's name is stored
    seen: dict = {}
    monkeypatch.setattr(sidflow.teachers, "load_teacher", lambda path, **kwargs: seen.update(kwargs))
    load_run_teacher(config, "cpu")
    assert (seen["text_encoder_dtype"], seen["revision"], seen["variant"], seen["token"]) == (
        torch.bfloat16,
        "v2",
        "fp16",
        "hf_secret",
    )
    assert teacher_load_options(TeacherConfig())["text_encoder_dtype"] is None  # auto: bf16 on CUDA, fp32 on CPU


def test_text_encoder_dtype_setting_loads_the_encoders_in_it(tiny):
    from sidflow.run.build import load_run_teacher

    config = SiDConfig(teacher=TeacherConfig(path=str(tiny("sd3")), text_encoder_dtype="bfloat16"))
    teacher = load_run_teacher(config, "cpu")
    assert {next(m.parameters()).dtype for m in teacher.text_encoders()} == {torch.bfloat16}
    assert teacher.denoiser.model_dtype == torch.float32


def test_variant_is_passed_to_from_pretrained(tiny, tmp_path):
    load_pipeline(tiny("flux")).save_pretrained(tmp_path / "teacher", variant="fp16")
    assert list((tmp_path / "teacher" / "transformer").glob("*.fp16.safetensors"))
    with pytest.raises(TeacherLoadError, match="cannot load"):  # only fp16 files: the variant is needed
        load_teacher(tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher", variant="fp16")
    assert teacher.denoiser.model_dtype == torch.float32
    assert hub_options(revision=None, variant="fp16", token="") == {"variant": "fp16"}


class _FakeDist:
    def __init__(self, rank: int, world: int, events: list) -> None:
        self.rank, self.world, self.events = rank, world, events

    def install(self, monkeypatch) -> None:
        import torch.distributed as dist

        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: self.world)
        monkeypatch.setattr(dist, "get_rank", lambda: self.rank)
        monkeypatch.setattr(dist, "barrier", lambda: self.events.append("barrier"))


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_zero_downloads_before_the_barrier(monkeypatch, rank):
    from diffusers import DiffusionPipeline

    events: list = []
    _FakeDist(rank, 2, events).install(monkeypatch)
    monkeypatch.setattr(
        DiffusionPipeline, "download", classmethod(lambda cls, repo, **kw: events.append(("download", repo, kw)))
    )
    options = download_first("org/model", {"revision": "v2"})
    if rank == 0:
        assert events == [("download", "org/model", {"revision": "v2"}), "barrier"]
        assert options == {"revision": "v2"}
    else:  # waits, then reads only what rank 0 put in the cache
        assert events == ["barrier"]
        assert options == {"revision": "v2", "local_files_only": True}


def test_failed_download_still_meets_the_barrier(monkeypatch):
    from diffusers import DiffusionPipeline

    events: list = []
    _FakeDist(0, 2, events).install(monkeypatch)

    def fail(cls, repo, **kw):
        raise OSError("offline")

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(fail))
    with pytest.raises(OSError):
        download_first("org/model", {})
    assert events == ["barrier"]  # the other ranks are released (and fail to find the files) rather than hang


def test_single_process_downloads_nothing_itself(monkeypatch):
    events: list = []
    _FakeDist(0, 1, events).install(monkeypatch)
    assert download_first("org/model", {"variant": "fp16"}) == {"variant": "fp16"} and events == []
