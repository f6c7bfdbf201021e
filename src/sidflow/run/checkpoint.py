"""Checkpoints as data: safetensors for tensors, JSON for scalars and the config; never pickle.

A checkpoint is a directory ``<run_dir>/checkpoints/step-XXXXXXXX/`` holding

* ``tensors.safetensors``: the trainer's flat tensor dict (networks, EMA, optimiser states);
* ``state.json``: ``{"format": 1, "step": ..., "scalars": {...}, "config": {...}, "shapes": {...}}``.

It is written to a temporary sibling directory and moved into place with ``os.replace``, so a crash
never leaves a half-written checkpoint under the final name (spec 11, style guideline 13).
Loading checks that both files exist and parse and that every tensor listed in ``state.json`` is in
the safetensors file with that shape; anything else raises a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sidflow.atomic import atomic_dir
from sidflow.collectives import broadcast_object
from sidflow.errors import CheckpointError
from sidflow.run.distributed import gather_state, shard_state_like

__all__ = [
    "save_trainer",
    "resume_trainer",
    "prune_checkpoints",
    "checkpoint_keys",
    "save_checkpoint",
    "write_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_dir",
    "is_checkpoint",
    "load_module_weights",
]

FORMAT = 1
TENSORS, STATE = "tensors.safetensors", "state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(
    run_dir: str | Path, step: int, state: dict[str, Any], config: dict[str, Any] | None = None
) -> Path:
    """Atomically write ``state`` (``{"tensors": {...}, "scalars": {...}}``) as checkpoint ``step``.

    Returns the final directory. An existing checkpoint of the same step is replaced.
    """
    return write_checkpoint(checkpoint_dir(run_dir, step), step, state, config)


def write_checkpoint(final: str | Path, step: int, state: dict[str, Any], config: dict[str, Any] | None = None) -> Path:
    """Atomically write ``state`` as a checkpoint directory at ``final`` (replacing one already there)."""
    final = Path(final)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state["tensors"].items()}
    meta = {
        "format": FORMAT,
        "step": step,
        "scalars": state["scalars"],
        "config": config or {},
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(meta, indent=1))
    return final


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", *, prefixes: tuple[str, ...] | None = None
) -> tuple[dict[str, Any], dict]:
    """Read a checkpoint directory; returns ``(state, config_dict)`` with ``state`` as saved.

    ``prefixes``: read only the tensors whose names start with one of them (e.g. ``("ema/",)``: the
    generator without the optimiser states, which are most of a checkpoint's bytes).
    """
    path = Path(path)
    if not (path / STATE).is_file() or not (path / TENSORS).is_file():
        raise CheckpointError(
            f"{path} is not a sidflow checkpoint (needs {STATE} and {TENSORS}); "
            "pass a step-XXXXXXXX directory or a run dir"
        )
    try:
        meta = json.loads((path / STATE).read_text())
        tensors = _read_tensors(path / TENSORS, device, prefixes)
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); delete it and resume from "
            "an earlier one"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}")
    shapes = {k: v for k, v in meta.get("shapes", {}).items() if prefixes is None or k.startswith(prefixes)}
    missing = sorted(set(shapes) ^ set(tensors))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is inconsistent: tensors {missing[:3]} are missing or "
            "unexpected; delete it and resume from an earlier one"
        )
    for key, shape in shapes.items():
        if list(tensors[key].shape) != shape:
            raise CheckpointError(
                f"checkpoint {path}: tensor {key} has shape {list(tensors[key].shape)}, state.json says {shape}"
            )
    return {"tensors": tensors, "scalars": meta["scalars"], "step": meta["step"]}, meta.get("config", {})


def _read_tensors(file: Path, device: torch.device | str, prefixes: tuple[str, ...] | None) -> dict[str, torch.Tensor]:
    if prefixes is None:
        return load_file(str(file), device=str(device))
    with safe_open(str(file), framework="pt", device=str(device)) as handle:
        return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefixes)}


def checkpoint_keys(path: str | Path) -> list[str]:
    """The tensor names of a checkpoint, from its ``state.json`` (no tensor is read)."""
    try:
        return list(json.loads((Path(path) / STATE).read_text()).get("shapes", {}))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {STATE} ({type(err).__name__})") from None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints of ``run_dir`` (0: keep all), and the
    temporary folders a killed write left behind. Returns the deleted folders."""
    root = Path(run_dir) / "checkpoints"
    if keep <= 0 or not root.is_dir():
        return []
    done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_checkpoint(p))
    stale = [p for _, p in done[:-keep]] + [p for p in root.iterdir() if p.name.startswith(".step-")]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def load_module_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    """Load the ``prefix``-named entries of a checkpoint's tensors into ``module`` (others keep their values)."""
    weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict({**module.state_dict(), **weights})
    return module


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds both checkpoint files (it may still be corrupt: :func:`load_checkpoint` checks)."""
    return (Path(path) / STATE).is_file() and (Path(path) / TENSORS).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint under ``run_dir/checkpoints`` (None if there is none)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    found = [(s, p) for s, p in found if is_checkpoint(p)]
    return max(found)[1] if found else None


# ---- the trainer's checkpoints in a run folder --------------------------------------------------
def save_trainer(
    trainer: Any, run_dir: Path, config: dict[str, Any], *, is_main: bool, sharded: bool, keep: int = 0
) -> Path | None:
    """Rank 0 writes the trainer's checkpoint (collective under FSDP2: every rank calls it, and the
    sharded tensors are gathered one at a time to rank 0's CPU); returns its folder, None elsewhere."""
    state = gather_state(trainer.state_dict(), device="cpu", rank0_only=True) if sharded else None
    if not is_main:
        return None
    path = save_checkpoint(run_dir, trainer.iteration, state or trainer.state_dict(), config)
    prune_checkpoints(run_dir, keep)  # after the new one is complete: a crash never leaves none
    return path


def resume_trainer(trainer: Any, run_dir: Path, *, rank: int, sharded: bool) -> Path | None:
    """Load the newest checkpoint rank 0 finds into ``trainer`` on every rank (the run folder must
    be shared by all nodes); under FSDP2 it is read on the CPU and re-sharded. None: nothing to resume."""
    ckpt = broadcast_object(latest_checkpoint(run_dir) if rank == 0 else None)
    if ckpt is None:
        return None
    if not Path(ckpt).is_dir():
        raise CheckpointError(
            f"rank {rank} cannot read {ckpt}; put the run folder on a file system shared by every node"
        )
    state, _ = load_checkpoint(ckpt, device="cpu" if sharded else trainer.device)
    trainer.load_state_dict(shard_state_like(state, trainer) if sharded else state)
    return Path(ckpt)
