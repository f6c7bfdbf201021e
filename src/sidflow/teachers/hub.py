"""Hub teachers: ``revision`` / ``variant`` / ``token``, and one download per run, not one per rank.

``teacher.revision`` pins a commit or branch, ``teacher.variant`` picks a weight variant
(``fp16``, ``bf16``: half the download), and the token is read from the environment variable named
by ``teacher.token_env`` (``HF_TOKEN`` by default), never stored in a config or ``config.json``.

Under ``torch.distributed`` every rank calling ``from_pretrained`` on a hub id downloads the same
files at once (8 x 30 GB racing into one cache). :func:`download_first` lets rank 0 fetch the
pipeline (diffusers' ``DiffusionPipeline.download``: ``snapshot_download`` restricted to the
pipeline's components and the variant) while the others wait at a barrier, then read the cache
only (``local_files_only``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sidflow.errors import TeacherLoadError

__all__ = ["hub_options", "token_from_env", "hub_index", "download_first"]


def hub_options(revision: str | None = None, variant: str | None = None, token: str | None = None) -> dict[str, Any]:
    """``from_pretrained`` keywords for the given hub settings (unset ones left out)."""
    options = {"revision": revision, "variant": variant, "token": token}
    return {key: value for key, value in options.items() if value}


def token_from_env(name: str) -> str | None:
    """The hub token from the environment variable ``name`` (``teacher.token_env``), or None."""
    if not name:
        return None
    return os.environ.get(name) or None


def hub_index(repo_id: str, options: dict[str, Any]) -> dict:
    """model_index.json of a hub id: shipped config offline, else the hub."""
    from sidflow.teachers.configs import shipped_config

    shipped = shipped_config(repo_id)
    if shipped is not None:  # the family and time scale are facts of the shipped config
        return {"_class_name": shipped["pipeline"], "_sidflow": {"family": shipped["family"]}}
    try:
        from huggingface_hub import hf_hub_download

        found = hf_hub_download(
            repo_id, "model_index.json", revision=options.get("revision"), token=options.get("token")
        )
        return json.loads(Path(found).read_text())
    except Exception as err:  # offline, unknown repo, gated: all one line
        raise TeacherLoadError(
            f"cannot read model_index.json of hub id {repo_id} ({type(err).__name__}); "
            "check the id, log in for gated repos, or pass a local folder"
        ) from None


def download_first(repo_id: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for this rank's ``from_pretrained`` of a hub id, after rank 0 downloaded it.

    Outside ``torch.distributed`` (or with one rank) nothing happens. Rank 0 downloads, then meets
    the others at a barrier, also when the download failed (they then fail to find the files in the
    cache, in one line, instead of hanging); the others load with ``local_files_only``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return options
    if dist.get_rank() == 0:
        from diffusers import DiffusionPipeline

        try:
            DiffusionPipeline.download(repo_id, **options)
        finally:
            dist.barrier()
        return options
    dist.barrier()
    return {**options, "local_files_only": True}
