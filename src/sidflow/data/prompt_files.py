"""Reading prompt lists (``data.prompts``) from text, JSONL, CSV, parquet files and datasets folders.

SiD is data-free: a run needs only a list of prompts. Large prompt sets usually come as a table
(a caption column in JSONL, CSV or parquet) or as a Hugging Face dataset saved with
``save_to_disk``, so :func:`read_prompts` reads all of these into one list of strings:

* ``prompts.txt`` (any suffix other than the ones below): one prompt per line;
* ``prompts.jsonl``, ``prompts.csv``, ``prompts.parquet``: one prompt per record, from ``column``;
* a folder written by ``datasets.Dataset.save_to_disk`` (holding ``dataset_info.json``,
  ``state.json`` or, for a ``DatasetDict``, ``dataset_dict.json``): ``path`` takes the ``"train"``
  split of a ``DatasetDict``, ``path::validation`` names another split.

The column is ``column`` when given (``data.prompt_column``), else the first of ``"text"``,
``"prompt"``, ``"caption"`` that the table has. Blank prompts (empty, whitespace, null) are
skipped, as blank lines of a text file are. pyarrow and datasets are optional (``sidflow[data]``)
and imported only to read those formats. Every problem is one :class:`~sidflow.errors.DataError`
line saying what is wrong and what to do.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from sidflow.errors import DataError

__all__ = ["read_prompts", "read_prompt_file", "pick_column", "DEFAULT_COLUMNS", "SPLIT_SEPARATOR"]

DEFAULT_COLUMNS = ("text", "prompt", "caption")  # tried in this order when no column is named
SPLIT_SEPARATOR = "::"  # "folder::split" picks a split of a saved DatasetDict
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_FORMATS = "a .txt (one prompt per line), .jsonl, .csv or .parquet file or a datasets folder (save_to_disk)"


def read_prompts(spec: str | Path, column: str | None = None) -> list[str]:
    """The prompts of ``spec``: a prompt file or a saved datasets folder (``folder[::split]``).

    Args:
        spec: the path (``data.prompts``), with an optional ``::split`` for a ``DatasetDict`` folder.
        column: the table column holding the prompts (``data.prompt_column``); None tries
            ``"text"``, ``"prompt"``, ``"caption"``.

    Returns:
        The non-blank prompts, stripped, in file order (duplicates kept: they weight the draws).

    Raises:
        DataError: a missing or empty source, an unknown column, a malformed record, or a missing
            optional dependency.
    """
    text = str(spec)
    path_text, _, split = text.rpartition(SPLIT_SEPARATOR) if SPLIT_SEPARATOR in text else (text, "", "")
    path = Path(path_text).expanduser()
    if path.is_dir():
        if not any((path / marker).is_file() for marker in _DATASET_MARKERS):
            raise DataError(f"{path} is a folder but not a saved dataset (no dataset_info.json); pass {_FORMATS}")
        return _nonblank(_read_dataset(path, split or None, column), path)
    if split:
        raise DataError(f"'{SPLIT_SEPARATOR}{split}' names a split, but {path} is not a datasets folder; drop it")
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; pass {_FORMATS}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv"):
        try:
            values = _read_jsonl(path, column) if suffix == ".jsonl" else _read_csv(path, column)
        except UnicodeDecodeError as err:
            raise _not_utf8(path, err) from None
        return _nonblank(values, path)
    if suffix == ".parquet":
        return _nonblank(_read_parquet(path, column), path)
    if column is not None:
        raise DataError(f"prompt_column={column!r} applies to tables, but {path} is a text file; unset it")
    return read_prompt_file(path)


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped); an empty file is a one-line :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def pick_column(
    columns: Sequence[str],
    column: str | None,
    path: Path,
    defaults: Sequence[str] = DEFAULT_COLUMNS,
    setting: str = "prompt_column (data.prompt_column, eval.prompt_column)",
) -> str:
    """``column`` if the table has it, else the first of ``defaults`` it has (one-line error naming
    ``setting`` otherwise)."""
    wanted = [column] if column is not None else list(defaults)
    for name in wanted:
        if name in columns:
            return name
    what = f"column {column!r}" if column is not None else "column " + " / ".join(map(repr, defaults))
    raise DataError(
        f"{path} has no {what} (it has: {', '.join(map(str, columns)) or 'none'}); set {setting} to the one to read"
    )


def _nonblank(values: Iterable[object], path: Path) -> list[str]:
    """Stripped non-blank strings; a non-string value (a list, a number) is a malformed record."""
    prompts = []
    for i, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{path}: record {i} holds a {type(value).__name__}, not a prompt string; fix the data")
        if value.strip():
            prompts.append(value.strip())
    if not prompts:
        raise DataError(f"{path} has no prompts (every record is blank); fill the prompt column")
    return prompts


def _not_utf8(path: Path, err: UnicodeDecodeError) -> DataError:
    """A file in another encoding (Latin-1, UTF-16, ...): name it and the fix, never a traceback."""
    return DataError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8")


def _read_jsonl(path: Path, column: str | None) -> list[object]:
    name, values = None, []  # only the prompt column is kept, not whole records
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err.msg}); write one object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number} is a {type(record).__name__}, not an object; write one per line")
            if name is None:
                name = pick_column(list(record), column, path)  # the first record decides the column
            if name not in record:
                raise DataError(f"{path}:{number} has no {name!r} key (it has: {', '.join(record)}); fix that line")
            values.append(record[name])
    if name is None:
        raise DataError(f"{path} has no records; write one JSON object per line")
    return values


def _read_csv(path: Path, column: str | None) -> list[object]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DataError(f"{path} is empty; write a header row naming the prompt column, then one row per prompt")
        name = pick_column(reader.fieldnames, column, path)
        return [row[name] for row in reader]


def _read_parquet(path: Path, column: str | None) -> list[object]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow; pip install 'sidflow[data]'") from None
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses for a bad file
        raise DataError(f"{path} is not a readable parquet file ({err}); rewrite it") from None
    name = pick_column(names, column, path)
    return pq.read_table(path, columns=[name]).column(name).to_pylist()  # only that column is read


def _read_dataset(path: Path, split: str | None, column: str | None) -> list[object]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the dataset {path} needs datasets; pip install 'sidflow[data]'") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = split or "train"
        if chosen not in loaded:
            raise DataError(
                f"{path} has no split {chosen!r} (it has: {', '.join(splits)}); "
                f"name one as {path}{SPLIT_SEPARATOR}SPLIT"
            )
        loaded = loaded[chosen]
    elif split:
        raise DataError(f"{path} is a single dataset without splits; drop '{SPLIT_SEPARATOR}{split}'")
    name = pick_column(loaded.column_names, column, path)
    return loaded.with_format("arrow")[name].to_pylist()  # one Arrow column, no per-row Python dicts
