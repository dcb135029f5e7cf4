"""The ``--data`` spec grammar (docs/USAGE.md, "Specs"): resolve a spec to an input dataset, and
load user factories.

Specs on the command line are trusted: a ``module:factory`` is imported and called
(:func:`_call_factory` is the one place that imports user code). Specs *recorded* in a
store, checkpoint or ``eval.json`` are data: see :func:`softlabels.teacher.spec.recorded_spec`.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from softlabels.errors import DataError, SpecError, one_line
from softlabels.inputs.array_files import open_array_file
from softlabels.inputs.arrays import InputDataset
from softlabels.inputs.digits import DIGITS_SPLITS, load_digits_split
from softlabels.inputs.text import absolute_document_spec, document_spec_path, is_document_spec
from softlabels.inputs.imagefolder import open_imagefolder

BUILTIN_DATASETS = tuple(f"digits:{split}" for split in DIGITS_SPLITS)
"""Built-in data specs."""

_DATA_FILE = re.compile(r"(?P<path>.+?\.(?:npz|npy|h5|hdf5|zarr))/?(?::(?P<names>[^:]*))?", re.I)
_DATA_OPTIONS = ("unlabeled",)


def _load_object(spec: str, what: str) -> Any:
    """Import ``package.module:attr[.attr]`` and return the attribute; SpecError on failure."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SpecError(f"{what} spec '{spec}' is not package.module:factory; name both parts")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # user code: ImportError, SyntaxError, anything raised at import
        raise SpecError(f"cannot import module '{module_name}' for {what} spec '{spec}' ({one_line(err, 300)}); "
                        "check that it is installed or on PYTHONPATH") from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise SpecError(f"module '{module_name}' has no attribute '{attr}' for {what} spec '{spec}'; "
                            "check the name after ':'") from err
    return obj


def _call_factory(spec: str, what: str, wanted: type | tuple[type, ...]) -> Any:
    """Resolve ``spec`` to an instance of ``wanted``, calling it with no arguments if needed (always
    for ``()``)."""
    obj = _load_object(spec, what)
    if not isinstance(obj, wanted):
        if not callable(obj):
            raise SpecError(f"'{spec}' is a {type(obj).__name__}, not a callable; point the {what} spec "
                            "at a factory function or class")
        try:
            obj = obj()
        except Exception as err:  # user code
            raise SpecError(f"{what} factory '{spec}' raised {one_line(err, 300)}; fix the factory") from err
    return obj


# ------------------------------------------------------------------- recorded specs


def _split_options(spec: str) -> tuple[str, str, str]:
    """``SPEC?unlabeled`` -> ``(SPEC, "?", "unlabeled")`` (a path that exists with a '?' in its name is kept whole)."""
    return spec.rpartition("?") if "?" in spec and not Path(spec).exists() else (spec, "", "")


def data_spec_path(spec: str) -> str | None:
    """The file a ``--data`` spec reads (``x.h5:X,Y?unlabeled`` -> ``x.h5``), or None (built-in, factory)."""
    if is_document_spec(spec):  # jsonl:, parquet:, hfds: (plain records, never code)
        return document_spec_path(spec)
    match = _DATA_FILE.fullmatch(_split_options(spec)[0])
    return match["path"] if match else None


# ---------------------------------------------------------------------------- data


class _MapDataset(InputDataset):
    """A user's map-style dataset with items ``x`` or ``(x, y)``, made into an InputDataset.

    ``num_classes`` comes from the dataset's ``num_classes`` or ``len(classes)`` when it
    has one; ``has_labels`` from the first item (a scan would read every item).
    """

    def __init__(self, dataset: Any, source: str) -> None:
        self.dataset, self.source = dataset, source
        try:
            first = dataset[0] if len(dataset) else None
        except Exception as err:  # user code
            raise DataError(f"dataset '{source}' failed on item 0 ({one_line(err, 300)}); fix the dataset") from err
        if first is None:
            raise DataError(f"dataset '{source}' is empty; return a dataset with at least one item")
        x, y = self._convert(first, 0)
        self.input_shape = tuple(x.shape)
        self.has_labels = bool(y >= 0)
        classes = getattr(dataset, "classes", None)
        self.num_classes = getattr(dataset, "num_classes", None) or (len(classes) if classes is not None else None)

    def _convert(self, item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = item, None
        if isinstance(item, tuple | list):
            if len(item) not in (1, 2):
                raise DataError(f"item {index} of '{self.source}' has {len(item)} parts; yield x or (x, y)")
            x, y = item[0], (item[1] if len(item) == 2 else None)
        try:
            x = torch.as_tensor(x, dtype=torch.float32, device="cpu").detach()
            y = torch.as_tensor(-1 if y is None else y, device="cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"item {index} of '{self.source}' is not numeric ({one_line(err, 300)}); "
                            "yield tensors or arrays, e.g. via a ToTensor transform") from err
        if y.ndim != 0 or y.is_floating_point() or y.is_complex() or int(y) < -1:
            raise DataError(f"item {index} of '{self.source}' has label {y.tolist()!r}; "
                            "labels must be integer class ids >= 0, or -1/None for unlabeled")
        return x, y.to(torch.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            item = self.dataset[index]
        except IndexError:
            if not 0 <= index < len(self.dataset):
                raise  # the sequence protocol's end, not a failure
            raise DataError(f"dataset '{self.source}' failed on item {index} (IndexError); fix the dataset") from None
        except Exception as err:  # user code, any item: one line, not a traceback from generate's or train's loop
            raise DataError(f"dataset '{self.source}' failed on item {index} ({one_line(err, 300)}); fix the dataset") \
                from err
        x, y = self._convert(item, index)
        if tuple(x.shape) != self.input_shape:
            raise DataError(f"item {index} of '{self.source}' has shape {tuple(x.shape)} but item 0 has "
                            f"{self.input_shape}; yield inputs of one shape")
        return x, y


def resolve_data(spec: str) -> InputDataset:
    """Resolve a ``--data`` spec (grammar in docs/USAGE.md) to a dataset."""
    base, sep, options = _split_options(spec)
    terms = options.split(",") if sep else []
    if base.startswith("imagefolder:"):
        own = [o for o in terms if o and o not in _DATA_OPTIONS]
        ds: InputDataset = open_imagefolder(base.partition(":")[2], own, spec)
    else:
        unknown = [o for o in terms if o not in _DATA_OPTIONS]
        if unknown:
            raise SpecError(f"unknown data option '{unknown[0]}' in '{spec}'; "
                            f"supported: {', '.join('?' + o for o in _DATA_OPTIONS)}")
        ds = _resolve_base(base)
    return ds.without_labels() if "unlabeled" in terms else ds


def absolute_data_spec(spec: str) -> str:
    """``spec`` with its file or folder path made absolute, as stores and eval results record it
    (``imagefolder:imgs?size=12`` -> ``imagefolder:/abs/imgs?size=12``); built-in and
    ``module:factory`` specs stay as they are."""
    if is_document_spec(spec):
        return absolute_document_spec(spec)
    if spec.startswith("text:"):  # the token grammar's text:PATH takes no options: all of it is the path
        return "text:" + os.path.abspath(spec.removeprefix("text:"))
    base, sep, options = _split_options(spec)
    if base.startswith("imagefolder:"):
        return "imagefolder:" + os.path.abspath(base.removeprefix("imagefolder:")) + sep + options
    match = None if base.startswith("digits:") else _DATA_FILE.fullmatch(base)
    if match is None:
        return spec
    return os.path.abspath(match["path"]) + base[match.end("path"):] + sep + options


def _resolve_base(spec: str) -> InputDataset:
    if spec.startswith("digits:"):  # a misspelt split gets the list of splits, not an import error
        return load_digits_split(spec.partition(":")[2])
    match = _DATA_FILE.fullmatch(spec)
    if match:
        names = match["names"]
        if not names:
            return open_array_file(match["path"])
        name, _, labels = names.partition(",")
        return open_array_file(match["path"], name, labels or None)
    if Path(spec).exists():
        raise DataError(f"unsupported data file '{spec}'; use a .npz, .npy, .h5/.hdf5 or .zarr file")
    if ":" in spec:
        ds = _call_factory(spec, "data", Dataset)
        if isinstance(ds, InputDataset):
            return ds
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise SpecError(f"data factory '{spec}' returned {type(ds).__name__}; return a map-style "
                            "torch Dataset (with __len__ and __getitem__)")
        return _MapDataset(ds, spec)
    raise SpecError(f"unknown dataset '{spec}'; use one of: {', '.join(BUILTIN_DATASETS)} "
                    "or a .npz/.npy/.h5:NAME/.zarr:NAME file or module:factory")
