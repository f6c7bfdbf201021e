"""Per-family defaults read from the loaded pipeline (issue 15): text length from the text
tokenizer, SANA's time scale from the transformer config; the settings still override both."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from sidflow.teachers import load_teacher
from sidflow.teachers.defaults import resolve_defaults


def _neutral_copy(tiny, family, tmp_path, name="teacher-a"):
    """The tiny pipeline under a folder name that says nothing about its family."""
    return shutil.copytree(tiny(family), tmp_path / name)


def test_flux_text_length_comes_from_tokenizer_2(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = _neutral_copy(tiny, "flux", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
    tokenizer.model_max_length = 32
    tokenizer.save_pretrained(folder / "tokenizer_2")
    capsys.readouterr()
    teacher = load_teacher(folder)
    lines = capsys.readouterr().out.strip().splitlines()
    assert teacher.max_sequence_length == 32
    assert teacher.encode_prompts(["a red cat"])["prompt_embeds"].shape[1] == 32
    load_line = [line for line in lines if line.startswith("teacher ")]
    assert len(load_line) == 1 and "text length 32 (tokenizer_2.model_max_length 32)" in load_line[0]
    assert "time scale 1 (flux default)" in load_line[0] and "VAE factor" in load_line[0]
    assert load_teacher(folder, max_sequence_length=16).max_sequence_length == 16  # the setting wins


def test_tokenizer_length_is_capped_by_the_family(tiny, capsys):
    teacher = load_teacher(tiny("sana"))  # the tiny Gemma tokenizer says 4096
    assert teacher.max_sequence_length == 300
    assert "model_max_length 4096, capped at 300" in capsys.readouterr().out


def test_sprint_time_scale_comes_from_the_transformer_config(tiny, tmp_path):
    folder = _neutral_copy(tiny, "sana_sprint", tmp_path, "teacher-b")
    assert not (folder / "sidflow_teacher.json").exists()
    assert json.loads((folder / "transformer" / "config.json").read_text())["timestep_scale"] == 0.001
    teacher = load_teacher(folder)
    assert teacher.family == "sana_sprint" and teacher.denoiser.time_scale == 1.0
    assert load_teacher(folder, time_scale=1000.0).denoiser.time_scale == 1000.0  # the setting wins


def test_sana_rf_folder_named_sprint_is_not_a_sprint_teacher(tiny, tmp_path):
    folder = _neutral_copy(tiny, "sana", tmp_path, "my-sprint-teacher")  # the name rule is gone
    teacher = load_teacher(folder)
    assert teacher.family == "sana" and teacher.denoiser.time_scale == 1000.0


@pytest.mark.parametrize(
    ("family", "tokenizers", "expected", "source"),
    [
        ("sd3", {"tokenizer_3": 512}, 77, "capped at 77"),
        ("sd3", {"tokenizer_3": 32}, 32, "tokenizer_3.model_max_length 32"),
        ("sd3", {}, 77, "no tokenizer_3 limit"),  # an SD3 pipeline without T5
        ("flux", {"tokenizer_2": int(1e30)}, 512, "no tokenizer_2 limit"),  # transformers' "unset"
        ("flux", {"tokenizer": 16, "tokenizer_2": 48}, 48, "tokenizer_2"),  # the T5, not CLIP
    ],
)
def test_resolution_rules(family, tokenizers, expected, source):
    pipe = SimpleNamespace(**{k: SimpleNamespace(model_max_length=v) for k, v in tokenizers.items()})
    chosen = resolve_defaults(pipe, family, name="x")
    assert chosen.max_sequence_length == expected and source in chosen.sources["text length"]
    given = resolve_defaults(pipe, family, name="x", max_sequence_length=5, origins={"max_sequence_length": "s"})
    assert given.max_sequence_length == 5 and given.sources["text length"] == "s"
