"""The README's two set-up commands stay the ones CI and new users actually run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_cmds = [c for c in _readme_commands() if "pytest" in c]
    assert test_cmds, "README must show the test command"
    assert test_cmds[0] in [line.strip() for line in ci], "'.ci/run' must call the README's test command"


def test_readme_main_command_installs_and_distills():
    main_cmds = [c for c in _readme_commands() if "sidflow distill" in c]
    assert main_cmds, "README must show the main command"
    assert "pip install" in main_cmds[0] and "constraints" in main_cmds[0]
