"""Checkpoints as data: safetensors and ``torch.distributed.checkpoint`` for tensors, JSON for
scalars and the config; never a pickled module or code.

Two layouts, both a directory written under a temporary name and moved into place with
``os.replace``, so a crash never leaves a half-written checkpoint under the final name (spec 11):

* single-file (format 1): ``tensors.safetensors`` (a flat tensor dict) + ``state.json``
  (``{"format": 1, "step", "scalars", "config", "shapes"}``). Kept snapshots (:mod:`sidflow.run.selection`)
  and the analytic runs use it; loading checks files, format and shapes and raises a one-line
  :class:`CheckpointError` otherwise.
* sharded (format 2), the trainer's checkpoints in a run (:func:`save_trainer`): every rank writes
  its shards of both networks, both optimiser states and the EMA with ``torch.distributed.checkpoint``
  (nothing is gathered); rank 0 adds ``state.json`` and ``generator.safetensors`` (the generator
  alone) and renames the folder into place. :func:`resume_trainer` reshards for any world size.
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

from sidflow.atomic import atomic_dir, replace_dir
from sidflow.collectives import barrier, broadcast_object, is_distributed
from sidflow.errors import CheckpointError
from sidflow.run.distributed import gather_state, shard_state_like
from sidflow.trainer import generator_state_dict

__all__ = [
    "save_trainer",
    "resume_trainer",
    "read_generator",
    "read_network",
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
    """Whether ``path`` is a complete checkpoint: ``state.json`` (written last) with the single-file
    tensors or the sharded ``torch.distributed.checkpoint`` ones (it may still be corrupt)."""
    path = Path(path)
    return (path / STATE).is_file() and ((path / TENSORS).is_file() or (path / DCP_METADATA).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint under ``run_dir/checkpoints`` (None if there is none)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    found = [(s, p) for s, p in found if is_checkpoint(p)]
    return max(found)[1] if found else None


# ---- the trainer's checkpoints in a run folder: torch.distributed.checkpoint ----------------------
DCP_FORMAT = 2
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint's FileSystemWriter
GENERATOR = "generator.safetensors"


def _dcp_state(trainer: Any) -> dict[str, Any]:
    """The trainer's tensors as a nested state for ``torch.distributed.checkpoint``: each network's
    and each optimiser's state keyed by parameter name (``get_state_dict``; DTensors stay sharded), and
    the EMA. Optimiser states are created first if the optimiser has not stepped yet (resume targets)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    fake, optim_fake = get_state_dict(trainer.fake, trainer.opt_fake)
    generator, optim_gen = get_state_dict(trainer.generator, trainer.opt_gen)
    state: dict[str, Any] = {"fake": fake, "generator": generator, "optim_fake": optim_fake, "optim_gen": optim_gen}
    if trainer.ema is not None:
        state["ema"] = trainer.ema
    return state


def _scalars(trainer: Any) -> dict[str, Any]:
    return {
        "iteration": trainer.iteration,
        "images_seen": trainer.images_seen,
        "nonfinite_total": dict(trainer.nonfinite_total),
    }


def save_trainer(
    trainer: Any, run_dir: Path, config: dict[str, Any], *, is_main: bool, sharded: bool, keep: int = 0
) -> Path | None:
    """Write the trainer's checkpoint ``checkpoints/step-XXXXXXXX/``; collective: every rank calls it.

    Every rank writes its own shards with ``torch.distributed.checkpoint`` (nothing is gathered), into
    a temporary folder that rank 0 renames into place once all have finished, so a kill at any point
    leaves the previous checkpoint the newest complete one. Rank 0 adds ``state.json`` (counters and
    config) and ``generator.safetensors``, the generator alone (EMA when on; gathered one tensor at a
    time), which ``sidflow sample`` and evaluation read without touching optimiser state. Then only
    the newest ``keep`` checkpoints stay (0: all). Returns the folder on rank 0, None elsewhere.
    """
    import torch.distributed.checkpoint as dcp

    final = checkpoint_dir(run_dir, trainer.iteration)
    tmp = final.with_name(f".{final.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_dcp_state(trainer), checkpoint_id=str(tmp), no_dist=not is_distributed())
    generator = gather_state(
        {"tensors": generator_state_dict(trainer, ema=True), "scalars": {}}, device="cpu", rank0_only=True
    )["tensors"]
    if is_main:
        save_file({k: v.contiguous() for k, v in generator.items()}, str(tmp / GENERATOR))
        meta = {
            "format": DCP_FORMAT,
            "step": trainer.iteration,
            "scalars": _scalars(trainer),
            "config": config,
            "generator": "ema" if trainer.ema is not None else "weights",
        }
        (tmp / STATE).write_text(json.dumps(meta, indent=1))  # last: its presence marks a complete write
        replace_dir(tmp, final)  # every rank's shards are written (dcp.save returned on all)
        prune_checkpoints(run_dir, keep)  # after the new one is complete: a crash never leaves none
    barrier()
    return final if is_main else None


def resume_trainer(trainer: Any, run_dir: Path, *, rank: int, sharded: bool) -> Path | None:
    """Load the newest checkpoint rank 0 finds into ``trainer`` on every rank (the run folder must be
    shared by all nodes). A ``torch.distributed.checkpoint`` checkpoint is read shard by shard and
    re-sharded for this job, whatever the world size that wrote it; the older single-file format is
    read in full on the CPU. None: nothing to resume."""
    ckpt = _newest(run_dir, rank)
    if ckpt is None:
        return None
    scalars = _load_trainer(trainer, ckpt, rank=rank, sharded=sharded)
    trainer.iteration, trainer.images_seen = int(scalars["iteration"]), int(scalars["images_seen"])
    trainer.nonfinite_total = dict(scalars["nonfinite_total"])
    return ckpt


def init_trainer(
    trainer: Any, source_run: Path, *, rank: int, sharded: bool, generator: str = "ema", optimizers: bool = False
) -> Path:
    """Start a fresh run from another run's newest checkpoint (``train.init_from``; the reference's
    SiDA stage starts from a SiD run): fake score, generator and EMA, the generator from its EMA
    weights when ``generator="ema"`` (and the run kept one), the optimiser states only with
    ``optimizers``; the counters start at 0. Collective like :func:`resume_trainer`."""
    ckpt = _newest(source_run, rank)
    if ckpt is None:
        raise CheckpointError(f"train.init_from={source_run} has no checkpoint; give the folder of a finished run")
    _load_trainer(trainer, ckpt, rank=rank, sharded=sharded, ema=_has_ema(ckpt))
    net = trainer.generator
    with torch.no_grad():
        state = net.state_dict()
        if trainer.ema is not None and generator == "ema" and _has_ema(ckpt):
            for name, value in trainer.ema.items():
                state[name].copy_(value)
        elif trainer.ema is not None and not _has_ema(ckpt):  # no EMA there: it starts from the generator
            for name, value in trainer.ema.items():
                value.copy_(state[name])
    if not optimizers:
        for opt in (trainer.opt_fake, trainer.opt_gen):
            opt.state.clear()
    trainer.iteration, trainer.images_seen, trainer.nonfinite_total = 0, 0, {}
    return ckpt


def _newest(run_dir: Path, rank: int) -> Path | None:
    ckpt = broadcast_object(latest_checkpoint(run_dir) if rank == 0 else None)
    if ckpt is None:
        return None
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(
            f"rank {rank} cannot read {ckpt}; put the run folder on a file system shared by every node"
        )
    return ckpt


def _has_ema(ckpt: Path) -> bool:
    if not (ckpt / DCP_METADATA).is_file():
        return any(k.startswith("ema/") for k in checkpoint_keys(ckpt))
    return _read_meta(ckpt).get("generator") == "ema"


def _load_trainer(trainer: Any, ckpt: Path, *, rank: int, sharded: bool, ema: bool = True) -> dict[str, Any]:
    """Load ``ckpt``'s networks, optimiser states (and EMA unless ``ema=False``) into ``trainer``;
    returns its scalars (counters)."""
    if not (ckpt / DCP_METADATA).is_file():
        state, _ = load_checkpoint(ckpt, device="cpu" if sharded else trainer.device)
        trainer.load_state_dict(shard_state_like(state, trainer) if sharded else state)
        return state["scalars"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = _read_meta(ckpt)
    state = _dcp_state(trainer)
    if not ema:
        state.pop("ema", None)
    try:
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=not is_distributed())
    except Exception as err:  # missing shards, other networks: one line
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit this run ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}); use the matching config"
        ) from None
    set_state_dict(trainer.fake, trainer.opt_fake, model_state_dict=state["fake"], optim_state_dict=state["optim_fake"])
    set_state_dict(
        trainer.generator, trainer.opt_gen, model_state_dict=state["generator"], optim_state_dict=state["optim_gen"]
    )
    return meta["scalars"]


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {path} has no readable {STATE} ({type(err).__name__}); delete it "
            "and resume from an earlier one"
        ) from None


def read_network(path: str | Path, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The full state of one network of a checkpoint (``"generator"``, ``"fake"`` or ``"ema"``),
    keyed as in its ``state_dict``, read alone: from a sharded checkpoint only that network's shards
    are loaded (assembled in full, in one process); optimiser states are never read."""
    path = Path(path)
    if not (path / DCP_METADATA).is_file():
        state, _ = load_checkpoint(path, device=device, prefixes=(f"{name}/",))
        return {k[len(name) + 1 :]: v for k, v in state["tensors"].items()}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    target = {
        key.removeprefix(name + "."): torch.empty(tuple(md.size), dtype=md.properties.dtype, device=device)
        for key, md in metadata.items()
        if key.startswith(name + ".") and isinstance(md, TensorStorageMetadata)
    }
    if not target:
        raise CheckpointError(f"checkpoint {path} holds no network {name!r}")
    dcp.load({name: target}, checkpoint_id=str(path), no_dist=True)  # this process alone reads it
    return target


def read_generator(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The generator's weights kept with a checkpoint (EMA when the run kept one), without reading
    any optimiser state: ``generator.safetensors`` of a sharded checkpoint, or the ``ema/`` (else
    ``generator/``) tensors of a single-file one or of a kept snapshot."""
    path = Path(path)
    if (path / GENERATOR).is_file():
        return load_file(str(path / GENERATOR), device=str(device))
    keys = checkpoint_keys(path)
    prefix = "ema/" if any(k.startswith("ema/") for k in keys) else "generator/"
    state, _ = load_checkpoint(path, device=device, prefixes=(prefix,))
    return {k[len(prefix) :]: v for k, v in state["tensors"].items()}
