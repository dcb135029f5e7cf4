"""One column of the records users hold: JSON Lines, Parquet and saved ``datasets`` directories.

:func:`read_column` returns the values of one key in file order, each with the line or row it
came from. Nothing read is executed or unpickled (docs/TOKENS.md says how each kind is read).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from softlabels.errors import DataError, one_line

__all__ = ["LM_EXTRA", "RECORD_KINDS", "Column", "optional_module", "read_column"]

RECORD_KINDS = ("jsonl", "parquet", "hfds")
_DATA_EXTRA = "pip install 'softlabels[data]'"
LM_EXTRA = "pip install 'softlabels[lm]'"


@dataclass(frozen=True)
class Column:
    """The values of one key, in file order; ``numbers[i]`` is value ``i``'s line (1-based, JSONL)
    or row (0-based, Parquet and ``datasets``)."""

    key: str
    values: list[Any]
    numbers: list[int]
    unit: str  # "line" or "row"
    source: str

    def where(self, i: int) -> str:
        """``line 7 of 'chat.jsonl'``: where value ``i`` came from."""
        return f"{self.unit} {self.numbers[i]} of '{self.source}'"


def _regular_file(path: str, what: str) -> None:
    if not Path(path).exists():
        raise DataError(f"{what} file '{path}' does not exist; check the path in --data")
    if not Path(path).is_file():
        raise DataError(f"{what} file '{path}' is not a regular file; pass the file itself")


# ------------------------------------------------------------------------------------ JSON Lines


def _jsonl_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line, decoded as UTF-8 (a leading BOM is dropped)."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"line {number} of '{path}' is not UTF-8 ({err.reason} at byte {offset + err.start}); "
                                "convert the file to UTF-8 (JSON Lines are UTF-8)") from None
            offset += len(raw)
            if number == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield number, text


def _jsonl_column(path: str, key: str) -> Column:
    _regular_file(path, "JSON Lines")
    values, numbers = [], []
    for number, text in _jsonl_lines(path):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"line {number} of '{path}' is not valid JSON ({err.msg} at column {err.colno}); "
                            "write one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"line {number} of '{path}' is a JSON {type(row).__name__}, not an object; "
                            f"write one object per line, with the key '{key}'")
        if key not in row or row[key] is None:
            keys = ", ".join(sorted(row)[:10]) or "(none)"
            raise DataError(f"line {number} of '{path}' has no '{key}' (its keys: {keys}); give every line a '{key}', "
                            "or name the right key in the spec")
        values.append(row[key])
        numbers.append(number)
    return Column(key, values, numbers, "line", path)


# -------------------------------------------------------------------------------------- Arrow


def optional_module(name: str, what: str, install: str) -> Any:
    """Import an optional package for ``what``; a one-line DataError if it is missing or does not import."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - a broken package is named, never blamed on the user's files
        top = name.partition(".")[0]
        if isinstance(err, ImportError) and (err.name or "").partition(".")[0] == top:
            raise DataError(f"{what} needs '{top}', which is not installed; {install}") from err
        raise DataError(f"{what} needs '{top}', which is installed but cannot be imported ({one_line(err)}); "
                        f"reinstall it: {install}") from err


def _pyarrow(kind: str) -> Any:
    optional_module("pyarrow.parquet", f"{kind} data", _DATA_EXTRA)
    return optional_module("pyarrow", f"{kind} data", _DATA_EXTRA)


def _is_text(pa: Any, dtype: Any) -> bool:
    view = getattr(pa.types, "is_string_view", lambda _t: False)
    return bool(pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or view(dtype))


def _arrow_column(pa: Any, column: Any, dtype: Any, key: str, source: str, text: bool) -> Column:
    """Values of an Arrow (chunked) array: strings for a text column, Python values otherwise."""
    if text and not _is_text(pa, dtype):
        raise DataError(f"column '{key}' of '{source}' holds {dtype}, not text; name a string column with "
                        "field=NAME (or a column of [{role, content}] lists with messages=NAME)")
    if column.null_count:
        first = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
        raise DataError(f"row {first} of '{source}' has no '{key}' (null); fill or drop the row")
    values = column.to_pylist()
    return Column(key, values, list(range(len(values))), "row", source)


def _parquet_column(path: str, key: str, text: bool) -> Column:
    pa = _pyarrow("parquet")
    _regular_file(path, "Parquet")
    try:
        pf = pa.parquet.ParquetFile(path)
        names = pf.schema_arrow.names
        table = pf.read(columns=[key]) if key in names else None
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read '{path}' as Parquet ({one_line(err, typed=False)}); "
                        "write it with pyarrow.parquet.write_table or pandas.DataFrame.to_parquet") from None
    if table is None:
        raise DataError(f"'{path}' has no column '{key}' (columns: {', '.join(names[:20])}); "
                        "name one of them in the spec")
    return _arrow_column(pa, table.column(key), table.schema.field(key).type, key, path, text)


# ------------------------------------------------------------------------- datasets directories


def _check_state(directory: Path) -> None:
    """Each ``state.json`` names data files inside its own directory (``load_from_disk`` joins them blindly)."""
    for state in [directory / "state.json", *directory.glob("*/state.json")]:
        if not state.is_file():
            continue
        try:
            files = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"'{state}' is not a datasets state file ({type(err).__name__}); "
                            "save the dataset again with save_to_disk") from None
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..")]
        if bad:
            raise DataError(f"'{state}' names data file {bad[0]!r} outside its directory; "
                            "save the dataset again with save_to_disk")


def _hfds_column(path: str, key: str, text: bool, split: str | None) -> Column:
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"datasets directory '{path}' does not exist or is no directory; "
                        "pass a directory written by Dataset.save_to_disk")
    if not (directory / "state.json").is_file() and not (directory / "dataset_dict.json").is_file():
        raise DataError(f"'{path}' holds neither state.json nor dataset_dict.json; "
                        "pass a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk")
    pa = _pyarrow("hfds")
    datasets = optional_module("datasets", "hfds data", _DATA_EXTRA)
    _check_state(directory)
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # its "Loading dataset from disk" bar, for many files; restored below
    try:
        ds = datasets.load_from_disk(str(directory), keep_in_memory=False)
    except Exception as err:  # noqa: BLE001 - the library raises many kinds; one line says which
        raise DataError(f"cannot load datasets directory '{path}' ({one_line(err)}); "
                        "save it again with save_to_disk") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    source = path
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            raise DataError(f"'{path}' holds the splits {', '.join(splits)}; "
                            f"pick one with split=NAME{'' if split is None else f' (not {split!r})'}")
        ds, source = ds[split], f"{path}[{split}]"
    elif split is not None:
        raise DataError(f"'{path}' holds one dataset, not splits; drop split={split}")
    if key not in ds.column_names:
        raise DataError(f"'{source}' has no column '{key}' (columns: {', '.join(ds.column_names[:20])}); "
                        "name one of them in the spec")
    table = ds.select_columns([key]).with_format("arrow")[:]
    return _arrow_column(pa, table.column(key), table.schema.field(key).type, key, source, text)


def read_column(kind: Literal["jsonl", "parquet", "hfds"], path: str | os.PathLike[str], key: str, *, text: bool,
                split: str | None = None) -> Column:
    """Column ``key`` of every record of a ``jsonl``, ``parquet`` or ``hfds`` source, in file order;
    ``text``: strings only (refused by type for Arrow; the caller checks JSONL values by line).
    ``split`` picks a split of a saved ``DatasetDict``. Refuses a source with no records."""
    path = str(path)
    if kind == "jsonl":
        column = _jsonl_column(path, key)
    elif kind == "parquet":
        column = _parquet_column(path, key, text)
    else:
        column = _hfds_column(path, key, text, split)
    if not column.values:
        raise DataError(f"'{column.source}' holds no records; pass a file with at least one "
                        f"{'line' if kind == 'jsonl' else 'row'}")
    return column
