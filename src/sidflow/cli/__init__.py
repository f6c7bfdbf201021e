"""The ``sidflow`` command: a thin dispatcher; each subcommand is a module of this package.

Subcommands import lazily so that ``sidflow --help`` and ``sidflow info`` stay fast.
"""

from __future__ import annotations

import importlib
import sys

from sidflow.errors import SidflowError

__all__ = ["main"]

# name -> (module in sidflow.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("distill", "distill a teacher into a 1-4 step generator by SiD (default: bundled teacher)"),
    "sample": ("sample", "generate images from a finished distillation run"),
    "eval": ("eval", "FD-DINOv2, FID, CLIP score, PickScore of a run or an exported pipeline"),
    "info": ("info", "describe a teacher: family, parameter counts, latent shapes, memory estimate"),
    "plan": ("plan", "peak memory per GPU of a run, simulated at true size (will it fit?)"),
    "teacher": ("teacher", "train the bundled tiny teacher (VAE, transformer, evaluator)"),
}


def _usage() -> str:
    lines = ["usage: sidflow <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'sidflow <command> --help' for a command's options."]
    return "\n".join(lines)


def _register_builtin_plugins() -> None:
    """The bundled benchmarks, also when sidflow runs from a source tree whose entry points
    (``sidflow.plugins``) are not installed; registering twice is harmless."""
    from sidflow.digits.plugin import register as register_digits
    from sidflow.toy.plugin import register as register_gmm

    register_digits()
    register_gmm()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sidflow: unknown command '{name}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name in ("distill", "sample", "eval"):
        _register_builtin_plugins()
    module = importlib.import_module(f"sidflow.cli.{COMMANDS[name][0]}")
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print("sidflow: interrupted", file=sys.stderr)
        return 130
    except SidflowError as err:  # user-facing errors: one line, no traceback
        print(f"sidflow {name}: error: {err}", file=sys.stderr)
        return 1
