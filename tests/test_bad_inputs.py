"""Bad inputs a new user meets first, each ending in one line (issue 15), never a traceback."""

from __future__ import annotations

import pytest

from sidflow.cli import main as cli_main
from sidflow.config import TrainConfig, apply_overrides
from sidflow.data.prompt_files import read_prompts
from sidflow.errors import ConfigError, DataError
from sidflow.run.presets import get_preset


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) < 300
    return text


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("prompts.txt", "a caf\xe9 at night\n"),  # Latin-1: the byte 0xe9 alone is not UTF-8
        ("prompts.jsonl", '{"text": "a caf\xe9"}\n'),
        ("prompts.csv", "text\na caf\xe9\n"),
    ],
)
def test_prompt_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as err:
        read_prompts(path)
    text = _one_line(err)
    assert str(path) in text and "save it as UTF-8" in text


def test_utf8_prompt_file_still_reads(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a caf\xe9 at night\n", encoding="utf-8")
    assert read_prompts(path) == ["a caf\xe9 at night"]


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "run.txt"
    taken.write_text("not a folder")
    assert cli_main(["distill", "--run-dir", str(taken)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is an existing file" in err and str(taken) in err
    assert cli_main(["distill", "--run-dir", str(taken / "below")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "under an existing file" in err
    assert taken.read_text() == "not a folder"


@pytest.mark.parametrize("override", ["train.max_steps=-5", "train.total_kimg=0", "train.total_kimg=-1.5"])
def test_training_length_must_be_positive(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]) as err:
        apply_overrides(get_preset("digits"), [override])
    _one_line(err)


def test_zero_steps_is_a_run_that_only_writes_its_start():
    assert TrainConfig(max_steps=0).num_steps() == 0  # train.init_from=... train.max_steps=0


def test_negative_length_through_the_cli_is_one_line(tmp_path, capsys):
    assert cli_main(["distill", "--run-dir", str(tmp_path / "run"), "train.max_steps=-5"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.max_steps=-5 must be >= 0" in err
    assert not (tmp_path / "run").exists()
