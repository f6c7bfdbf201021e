"""Atomic writes: a file or a directory appears complete under its final name, or not at all.

Both write into a temporary sibling first and move it into place with ``os.replace`` (atomic on
POSIX within one file system), so a crash never leaves a half-written checkpoint or cache shard.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "atomic_dir", "replace_dir"]


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it replaces ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final`` (and any
    directory already there, which is moved aside first and then deleted)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the complete directory ``tmp`` to ``final``; a directory already at ``final`` is first
    moved aside (so ``final`` is never half-written) and deleted afterwards."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
