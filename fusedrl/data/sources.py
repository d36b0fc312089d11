"""Where records come from: files, Hugging Face `datasets` sources, and the column mapping.

    kind, location, split = parse_source("hf:org/name:test")       # ("hub", "org/name", "test")
    located = read_dataset(source, split="train")                   # [(where, row dict), ...]
    located = map_columns(located, {"prompt": "question"}, source)  # rows renamed, columns checked

Sources (a run's ``data.train`` / ``data.eval``):

    file.jsonl / .json / .parquet   read directly (see fusedrl.data.records)
    FOLDER                          a dataset written by ``save_to_disk`` (Dataset or DatasetDict),
                                    else a local dataset folder or script: ``datasets.load_dataset(FOLDER)``
    script.py                       a local dataset script: ``datasets.load_dataset(script.py)``
    hf:org/name                     a dataset on the Hugging Face Hub: ``datasets.load_dataset("org/name")``

A dataset source may end with ``:SPLIT`` (``hf:org/name:test``, ``./saved:validation``);
without one, data.train reads ``data.split`` and data.eval ``data.eval_split``. A saved
single ``Dataset`` has no splits and ignores the split.

The column mapping (``[data] columns = {prompt = "question", answer = "solution"}``) renames
the dataset's columns to the record fields fusedrl reads, before any record is validated, so
every stage's checks run on the mapped names. A mapped column the source lacks is an error
naming the column and listing the source's columns. ``datasets`` is the optional extra
``fusedrl[data]``; without it a dataset source is a one-line DataError naming the extra.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from fusedrl.config import check_data_columns
from fusedrl.data.validate import DataError

HF_PREFIX = "hf:"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
INSTALL_HINT = "pip install 'fusedrl[data]' (the `datasets` package)"
_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


# ----------------------------------------------------------------------------- the run's options

class DataOptions:
    """The run's column mapping and default splits (``[data] columns``, ``split``, ``eval_split``)."""

    def __init__(self, columns: Optional[Mapping[str, str]] = None, splits: Optional[Mapping[str, str]] = None):
        self.columns = dict(columns or {})
        self.splits = dict(splits or {})  # source -> its default split

    def split_for(self, source: str) -> Optional[str]:
        return self.splits.get(source)


_OPTIONS: List[DataOptions] = [DataOptions()]


def data_options() -> DataOptions:
    """The options `load_records` applies when not given its own: those of the running run."""
    return _OPTIONS[-1]


class using_data_options:
    """Context manager: `load_records` calls inside map columns and pick splits as ``data`` (a DataConfig) says."""

    def __init__(self, data: Any):
        columns = getattr(data, "columns", None) or {}
        check_columns(columns)
        splits = {}
        if getattr(data, "eval", None):
            splits[data.eval] = getattr(data, "eval_split", None) or "test"
        if getattr(data, "train", None):
            splits[data.train] = getattr(data, "split", None) or "train"
        self.options = DataOptions(columns, splits)

    def __enter__(self):
        _OPTIONS.append(self.options)
        return self

    def __exit__(self, *exc):
        _OPTIONS.pop()
        return False


def check_columns(columns: Any) -> None:
    """ValueError naming data.columns[.FIELD] unless ``columns`` maps record fields to distinct column names."""
    if not isinstance(columns, Mapping):
        raise DataError(f"data.columns: expected a table {{field = \"column\"}}, got {columns!r}")
    check_data_columns(dict(columns))


# ----------------------------------------------------------------------------- sources

def is_file_source(source: str) -> bool:
    return os.path.splitext(source)[1].lower() in FILE_SUFFIXES


def parse_source(source: str) -> Tuple[str, str, Optional[str]]:
    """(kind, location, split from a ``:SPLIT`` suffix or None) of a dataset source.

    kind: "saved" (a ``save_to_disk`` folder), "local" (a dataset folder or script),
    "hub" (``hf:org/name``, or a bare ``org/name`` that is not a path), or "missing" (a path that does
    not exist).
    """
    if source.startswith(HF_PREFIX):
        name = source[len(HF_PREFIX):]
        name, _, split = name.partition(":")
        if not name:
            raise DataError(f"source: {source!r} names no dataset; expected hf:org/name or hf:org/name:split")
        return "hub", name, split or None
    location, split = source, None
    if not os.path.exists(source) and ":" in source:
        head, _, tail = source.rpartition(":")
        if head and os.path.exists(head) and tail and "/" not in tail:
            location, split = head, tail
    if os.path.isdir(location):
        saved = any(os.path.isfile(os.path.join(location, m)) for m in _SAVED_MARKERS)
        return ("saved" if saved else "local"), location, split
    if os.path.isfile(location) and location.endswith(".py"):
        return "local", location, split
    if os.path.exists(location):
        return "unsupported", location, split
    if location.startswith((".", "/", "~")) or location.count("/") != 1:
        return "missing", location, split
    return "hub", location, split


def _datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"source: {source!r} is a Hugging Face dataset source, which needs the optional extra: "
                        f"{INSTALL_HINT}; or pass a .jsonl/.json/.parquet file") from None
    return datasets


def read_dataset(source: str, *, split: Optional[str] = None) -> Tuple[List[Tuple[str, dict]], List[str]]:
    """The rows of a dataset source as (where, dict) pairs, and the dataset's column names.

    ``split`` applies unless the source carries its own ``:SPLIT``; default "train".
    """
    kind, location, own_split = parse_source(source)
    if kind == "missing":
        raise FileNotFoundError(f"source: {source!r} does not exist (relative paths are from {os.getcwd()})")
    if kind == "unsupported":
        raise DataError(f"source: unsupported file type {source!r}; expected one of {FILE_SUFFIXES}, a dataset "
                        "folder (save_to_disk) or a dataset script")
    datasets = _datasets(source)
    split = own_split or split or "train"
    if kind == "saved":
        loaded = datasets.load_from_disk(location)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"source: {source!r} has no split {split!r}; its splits are {sorted(loaded)} "
                                "(set data.split / data.eval_split or add ':SPLIT' to the source)")
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(location, split=split)
        except (ValueError, OSError) as err:  # an unknown split, no data files, not on the hub, offline, ...
            lines = str(err).strip().splitlines() or [type(err).__name__]
            raise DataError(f"source: {source!r}: {lines[0]}") from None
    names = list(loaded.column_names)
    return [(f"{source}[{split}] row {i}", dict(row)) for i, row in enumerate(loaded)], names


# ----------------------------------------------------------------------------- column mapping

def map_columns(located: List[Tuple[str, Any]], columns: Mapping[str, str], source: str,
                column_names: Optional[List[str]] = None) -> List[Tuple[str, Any]]:
    """Rename each row's columns to record fields: ``columns = {field: column}``.

    Args:
        located: (where, row) pairs.
        columns: record field -> the source's column holding it; empty: rows unchanged.
        source: named in errors.
        column_names: the source's columns (a dataset's schema); None: the keys of every row.
    Raises:
        DataError naming ``data.columns.FIELD`` when its column is not one of the source's,
        listing the source's columns.
    """
    if not columns:
        return located
    check_columns(columns)
    if column_names is None:
        names: Dict[str, None] = {}
        for _, row in located:
            if isinstance(row, dict):
                names.update(dict.fromkeys(row))
        column_names = list(names)
    for name, column in columns.items():
        if column not in column_names:
            raise DataError(f"data.columns.{name}: column {column!r} is not in {source!r}; its columns are "
                            f"{sorted(column_names)}")
    out = []
    for where, row in located:
        if isinstance(row, dict):
            mapped = {key: value for key, value in row.items() if key not in columns.values()}
            for name, column in columns.items():
                if column in row:
                    mapped[name] = row[column]
            row = mapped
        out.append((where, row))
    return out
