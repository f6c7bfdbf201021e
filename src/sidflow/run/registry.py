"""Extension points of the run layer: runners, evaluations, named teachers and prompt sets.

The run layer never imports the bundled benchmarks; they plug in here. A plugin is a function
registered under the ``sidflow.plugins`` entry-point group of an installed package (sidflow's own:
``digits`` and ``gmm``, see ``pyproject.toml``); every lookup loads the plugins once first. A plugin
calls the ``register_*`` functions below and :func:`sidflow.run.presets.register_preset`.

* runners: ``teacher.kind`` -> ``runner(config, run_dir) -> metrics`` (``"pipeline"``, the diffusers
  teachers, is :func:`sidflow.run.loop.run_pipeline` and needs no registration);
* evaluations: ``eval.kind`` -> ``factory(config, teacher, latent_shape, device) -> Evaluation``;
* teacher aliases: ``teacher.path`` names such as ``"bundled"`` -> a pipeline folder;
* prompt sets: ``data.prompts=builtin:NAME`` -> a list of prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidflow.config import SiDConfig
from sidflow.data.prompt_files import read_prompts
from sidflow.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from sidflow.eval.protocol import Evaluation

__all__ = [
    "PLUGIN_GROUP",
    "load_plugins",
    "register_runner",
    "get_runner",
    "register_evaluation",
    "make_evaluation",
    "evaluates_on_all_ranks",
    "validate",
    "register_teacher_alias",
    "resolve_teacher_path",
    "register_prompt_set",
    "register_image_set",
    "resolve_image_source",
    "resolve_prompts",
    "BUILTIN_PREFIX",
]

PLUGIN_GROUP = "sidflow.plugins"
BUILTIN_PREFIX = "builtin:"
Runner = Callable[[SiDConfig, Path], dict[str, Any]]
# (config, teacher, latent_shape, device, **context) -> Evaluation; context: what the run offers
# (``prompt_source``: the evaluation prompts' cached embeddings, ``teacher_precision``), to take or ignore
EvaluationFactory = Callable[..., "Evaluation"]

_RUNNERS: dict[str, Runner] = {}
_EVALUATIONS: dict[str, EvaluationFactory] = {}
_TEACHERS: dict[str, Path] = {}
_PROMPT_SETS: dict[str, Callable[[], list[str]]] = {}
_IMAGE_SETS: dict[str, Callable[[], Path]] = {}
_loaded = False


def _t2i(
    config: SiDConfig,
    teacher: Any,
    latent_shape: tuple[int, ...],
    device: torch.device,
    prompt_source: Any = None,
    teacher_precision: str = "teacher weights",
) -> Evaluation:
    """``eval.kind=t2i`` (built in): :class:`sidflow.eval.t2i.T2IEvaluation` on the run's prompt sets."""
    import torch.distributed as dist

    from sidflow.eval.t2i import T2IEvaluation  # lazy: transformers' metric models

    ec = config.eval
    shared = dist.is_available() and dist.is_initialized()  # built on every rank of a run
    if not ec.prompts:
        raise ConfigError("eval.kind=t2i needs eval.prompts (a prompt file or builtin:NAME) to score the student on")
    return T2IEvaluation(
        config,
        teacher,
        latent_shape,
        device,
        prompts=resolve_prompts(ec.prompts, ec.prompt_column),
        val_prompts=resolve_prompts(ec.val_prompts, ec.prompt_column) if ec.val_prompts else [],
        rank=dist.get_rank() if shared else 0,
        world_size=dist.get_world_size() if shared else 1,
        prompt_source=prompt_source,
        teacher_precision=teacher_precision,
    )


_EVALUATIONS["t2i"] = _t2i
_ALL_RANKS: set[str] = {"t2i"}


def load_plugins() -> None:
    """Run every ``sidflow.plugins`` entry point once (idempotent)."""
    global _loaded
    if _loaded:
        return
    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()()
    _loaded = True


def _register(table: dict, kind: str, value: Any, what: str, replace: bool) -> None:
    if kind in table and not replace:
        raise ConfigError(f"{what} {kind!r} is already registered")
    table[kind] = value


def _get(table: dict, kind: str, what: str, setting: str, prefix: str = "") -> Any:
    load_plugins()
    if kind not in table:
        choices = ", ".join(prefix + name for name in sorted(table))
        raise ConfigError(f"{setting}={prefix + kind!r} is not a known {what}; choose one of: {choices}")
    return table[kind]


def validate(config: SiDConfig) -> None:
    """Fail fast, before anything is loaded, on a ``teacher.kind`` or ``eval.kind`` nobody registered."""
    if config.teacher.kind != "pipeline":
        get_runner(config.teacher.kind)
    elif config.gan.mode == "sida" and not config.data.real:
        raise ConfigError(
            "gan.mode=sida needs real images with captions: set data.real (a folder with a captions file, "
            "a parquet file, a datasets folder or builtin:NAME); or gan.mode=off"
        )
    if config.eval.kind != "none":
        _get(_EVALUATIONS, config.eval.kind, "evaluation", "eval.kind")


def register_runner(kind: str, runner: Runner, *, replace: bool = False) -> None:
    """Make ``teacher.kind=<kind>`` runnable by ``sidflow distill``."""
    _register(_RUNNERS, kind, runner, "runner", replace)


def get_runner(kind: str) -> Runner:
    return _get(_RUNNERS, kind, "runner", "teacher.kind")


def register_evaluation(
    kind: str, factory: EvaluationFactory, *, replace: bool = False, all_ranks: bool = False
) -> None:
    """Make ``eval.kind=<kind>`` available to runs. ``all_ranks``: the evaluation shares its samples
    between ranks (built and called on every rank, each with a generator); otherwise only rank 0
    builds and calls it."""
    _register(_EVALUATIONS, kind, factory, "evaluation", replace)
    if all_ranks:
        _ALL_RANKS.add(kind)
    else:
        _ALL_RANKS.discard(kind)


def evaluates_on_all_ranks(config: SiDConfig) -> bool:
    """Whether ``eval.kind`` runs on every rank (see :func:`register_evaluation`)."""
    load_plugins()
    return config.eval.kind in _ALL_RANKS


def make_evaluation(
    config: SiDConfig, teacher: Any, latent_shape: tuple[int, ...], device: torch.device, **context: Any
) -> Evaluation | None:
    """The evaluation protocol named by ``eval.kind`` (None for ``"none"``); ``context`` is passed on
    to the factory (see :data:`EvaluationFactory`)."""
    if config.eval.kind == "none":
        return None
    factory = _get(_EVALUATIONS, config.eval.kind, "evaluation", "eval.kind")
    return factory(config, teacher, tuple(latent_shape), device, **context)


def register_teacher_alias(name: str, folder: Path, *, replace: bool = False) -> None:
    """Let ``teacher.path=<name>`` stand for a pipeline folder (e.g. one shipped with a plugin)."""
    _register(_TEACHERS, name, Path(folder), "teacher alias", replace)


def resolve_teacher_path(path: str) -> str:
    """A registered alias -> its folder; anything else is a folder or a hub id, returned as given."""
    if not path:
        raise ConfigError(
            "teacher.path is empty; give a diffusers pipeline folder or hub id "
            "(or 'bundled' for the tiny teacher shipped with sidflow)"
        )
    load_plugins()
    return str(_TEACHERS[path]) if path in _TEACHERS else path


def register_image_set(name: str, folder: Callable[[], Path], *, replace: bool = False) -> None:
    """Let ``data.real=builtin:<name>`` stand for an image source (``folder()`` returns it, e.g. a
    folder with a captions file that a plugin writes on first use)."""
    _register(_IMAGE_SETS, name, folder, "image set", replace)


def resolve_image_source(spec: str) -> str:
    """``data.real``: ``builtin:NAME`` -> its source; anything else is returned as given."""
    if spec.startswith(BUILTIN_PREFIX):
        return str(_get(_IMAGE_SETS, spec.removeprefix(BUILTIN_PREFIX), "image set", "data.real", BUILTIN_PREFIX)())
    return spec


def register_prompt_set(name: str, prompts: Callable[[], list[str]], *, replace: bool = False) -> None:
    """Let ``data.prompts=builtin:<name>`` stand for a list of prompts."""
    _register(_PROMPT_SETS, name, prompts, "prompt set", replace)


def resolve_prompts(spec: str, column: str | None = None) -> list[str]:
    """``data.prompts``: ``builtin:NAME`` or a prompt file / saved dataset read by
    :func:`~sidflow.data.prompt_files.read_prompts` (``column``: ``data.prompt_column``)."""
    if not spec:
        raise ConfigError("data.prompts is empty; give a prompt file (one prompt per line) or builtin:NAME")
    if spec.startswith(BUILTIN_PREFIX):
        if column is not None:
            raise ConfigError(f"data.prompt_column={column!r} applies to prompt tables, not {spec}; unset it")
        return list(
            _get(_PROMPT_SETS, spec.removeprefix(BUILTIN_PREFIX), "prompt set", "data.prompts", BUILTIN_PREFIX)()
        )
    return read_prompts(spec, column)
