"""Pair a user's own map-style dataset with its stored teacher targets, item by item, by sample id.

``with_targets(dataset, store)[i]`` is ``(dataset[i], target)``: the user's item unchanged and the
typed teacher target of the sample whose id the item carries (the index, an id column or a function).
Targets come from blocks of rows decoded once per process into a small LRU cache
(``cache_mib``): the whole store when it fits, read and checked when the pairing is made (forked
workers share it), else one write unit each. docs/LIBRARY.md ("Pairing a dataset with its store")
says what each position kind (sample, views, tokens) gives.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.errors import ConfigError, DataError, FingerprintMismatch
from softlabels.library.batches import PairedItems, join_targets
from softlabels.store.format import is_int

__all__ = ["TargetDataset", "with_targets"]

IdSpec = str | Callable[[int], int] | Sequence[int] | np.ndarray | None
_LABEL_KEYS = ("label", "labels")
_LABEL_CHECKS = 16  # items whose label is compared with the store's at construction


def with_targets(dataset: Any, store: Any, ids: IdSpec = None, *,
                 view_transform: Callable[[Any, dict[str, float]], Any] | str | None = None, epoch: int = 0,
                 check: bool = True, cache_mib: float = 256) -> TargetDataset:
    """``dataset`` (map-style: ``len`` and ``[i]``) paired with ``store`` (a path or an opened store) by sample id.

    ``ids``: item ``i``'s sample id is ``i`` (None), ``dataset[i][ids]`` (a column name), ``ids(i)`` (a
    function) or ``ids[i]`` (a sequence). ``check``: compare the dataset with what the store recorded (a
    softlabels ``InputDataset`` or ``TokenDataset``: its fingerprint; others: a few items' labels).
    """
    return TargetDataset(dataset, store, ids, view_transform=view_transform, epoch=epoch, check=check,
                         cache_mib=cache_mib)


class TargetDataset(Dataset):
    """A map-style dataset of ``(user item, typed target)`` (made by :func:`with_targets`)."""

    def __init__(self, dataset: Any, store: Any, ids: IdSpec = None, *,
                 view_transform: Callable[[Any, dict[str, float]], Any] | str | None = None, epoch: int = 0,
                 check: bool = True, cache_mib: float = 256) -> None:
        from softlabels.store.reader import open_store

        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError(f"dataset= must be map-style (len() and dataset[i]), got {type(dataset).__name__}; "
                              "wrap an iterable dataset's items in a list or a map-style Dataset")
        if not (isinstance(cache_mib, (int, float)) and cache_mib > 0):
            raise ConfigError(f"cache_mib must be a number > 0, got {cache_mib!r}")
        self.dataset = dataset
        self.store = open_store(store) if isinstance(store, (str, Path)) else store
        meta = self.store.meta
        self.kind = meta.positions
        self.layout = meta.layout_obj()
        self._unit_samples = meta.geometry.unit_samples
        self.epoch = int(epoch)
        self.rows = _rows_of(dataset, self.store, ids)
        per_sample = math.ceil(self.store.positions.num_positions / max(1, self.store.num_samples))
        unit_bytes = meta.geometry.unit_samples * self.layout.bytes_per_position * max(1, per_sample)
        self._keep = max(1, int(cache_mib * 2**20 // max(1, unit_bytes)))
        self._cache: OrderedDict[int, tuple[Any, dict[str, np.ndarray]]] = OrderedDict()
        self._replay = None
        if self.kind == "views":
            self._replay = _view_replay(self.store, view_transform)
        elif view_transform is not None:
            raise ConfigError(f"view_transform= is for views stores but {self.store.path} holds {self.kind} "
                              "positions; drop view_transform")
        if check:
            _check_dataset(dataset, self.store, self.rows)
        self._span = self._unit_samples  # rows per cached block (all rows when they fit)
        if self.kind != "tokens" and self._keep >= self.store.num_units:
            self._span *= self.store.num_units
            self._block(0)  # now: forked DataLoader workers share it, not each reading it per epoch

    num_classes = property(lambda self: self.store.num_classes)

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Views stores: which stored view each sample gives in this epoch (re-made workers see it)."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:  # workers get the store (no open handle) and an empty cache
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if self.kind != "tokens":  # a batch of one: the same gather as a DataLoader's
            return self.__getitems__([index])[0]
        item = self.dataset[index]
        row = int(self.rows[index])
        (target, extra), r = self._block(row // self._span), row % self._span
        off, n = int(extra["offsets"][r]), int(extra["lengths"][r])
        _check_tokens(item, n, index, self.store.path)
        return item, target.select(slice(off, off + n))

    def __getitems__(self, indices: list[int]) -> Any:
        """A batch of pairs for a ``DataLoader``: the targets gathered with one index per array (and unit)."""
        if self.kind == "tokens":
            return [self[i] for i in indices]
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(list(indices)) if fetch else [self.dataset[i] for i in indices]
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        blocks, within = rows // self._span, rows % self._span
        groups = [(pick, *self._block(int(b)), within[pick])
                  for b in np.unique(blocks) for pick in [np.flatnonzero(blocks == b)]]
        picked, params = [], []
        for _, target, extra, r in groups:
            at: Any = torch.from_numpy(r)
            if self.kind == "views":
                v = _choose(self.store, extra["sample_ids"][r], self.epoch)
                params.append(extra["view_params"][r, v])
                at = (at, torch.from_numpy(v))
            picked.append(target.select(at))
        target = join_targets(picked, torch.cat) if len(picked) > 1 else picked[0]
        if len(groups) > 1:  # back to the batch's order
            back = np.argsort(np.concatenate([g[0] for g in groups]), kind="stable")
            target = target.select(torch.from_numpy(back))
            params = [np.concatenate(params)[back]] if params else params
        if self.kind == "views":
            items = [self._replay(item, p) for item, p in zip(items, np.concatenate(params))]
        return PairedItems(items, target)

    def _block(self, b: int) -> tuple[Any, dict[str, np.ndarray]]:
        """Rows ``b * _span`` on decoded (least recently used blocks leave the cache first)."""
        hit = self._cache.get(b)
        if hit is not None:
            self._cache.move_to_end(b)
            return hit
        per = self._span // self._unit_samples  # write units per block
        units = range(b * per, min((b + 1) * per, self.store.num_units))
        arrays = [self.store.read_unit(u, verify=True) for u in units]
        block = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]} if per > 1 else arrays[0]
        hit = self._cache[b] = self.layout.decode(block), block
        if len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return hit


# -- joining by sample id -------------------------------------------------------------------------------------------
def _dataset_ids(dataset: Any, ids: IdSpec) -> np.ndarray:
    n = len(dataset)
    if ids is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(ids, str):
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: the column at once
            if ids not in dataset.column_names:
                raise ConfigError(f"ids={ids!r} is not a column of the dataset (columns: "
                                  f"{', '.join(dataset.column_names)}); name its sample-id column")
            return np.asarray(dataset[ids], dtype=np.int64)
        try:
            return np.asarray([dataset[i][ids] for i in range(n)], dtype=np.int64)
        except (KeyError, TypeError, IndexError):
            raise ConfigError(f"ids={ids!r}: the dataset's items cannot be indexed by {ids!r}; pass a function "
                              "ids=lambda i: ... returning item i's sample id") from None
    got = np.asarray([ids(i) for i in range(n)] if callable(ids) else ids, dtype=np.int64)
    if got.shape != (n,):
        raise ConfigError(f"ids= gives {got.size} sample ids for a dataset of {n} items; give one per item")
    return got


def _rows_of(dataset: Any, store: Any, ids: IdSpec) -> np.ndarray:
    """Each item's row in the store, or a one-line error naming how many ids miss and the first."""
    wanted = _dataset_ids(dataset, ids)
    if ids is None and len(wanted) != store.num_samples:
        raise DataError(f"dataset= has {len(wanted)} items but {store.path} holds {store.num_samples} samples; "
                        "pair the dataset the store was generated from, or pass ids= naming each item's sample id")
    stored = store.whole("sample_ids").astype(np.int64)
    if np.array_equal(stored, np.arange(len(stored))):
        inside = (wanted >= 0) & (wanted < len(stored))
        rows = np.where(inside, wanted, 0)
    else:
        order = np.argsort(stored, kind="stable")
        at = np.searchsorted(stored[order], wanted).clip(0, max(0, len(stored) - 1))
        rows = order[at] if len(stored) else np.zeros_like(wanted)
        inside = stored[rows] == wanted if len(stored) else np.zeros(len(wanted), bool)
    if not inside.all():
        bad = np.flatnonzero(~inside)
        raise DataError(f"{len(bad)} of the dataset's {len(wanted)} sample ids are not in {store.path} (first: id "
                        f"{int(wanted[bad[0]])} of item {int(bad[0])}); pair the store generated from this dataset, "
                        "or fix ids=")
    return rows.astype(np.int64)


# -- checks ---------------------------------------------------------------------------------------------------------
def _label(item: Any) -> int | None:
    if isinstance(item, dict):
        value = next((item[k] for k in _LABEL_KEYS if k in item), None)
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        value = item[1]
    else:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    return int(value) if is_int(value) else None


def _check_dataset(dataset: Any, store: Any, rows: np.ndarray) -> None:
    from softlabels.inputs.arrays import InputDataset
    from softlabels.inputs.tokens import TokenDataset

    expected = store.meta.source.get("fingerprint")
    if isinstance(dataset, (InputDataset, TokenDataset)):
        if expected:
            from softlabels.inputs.fingerprints import fingerprint
            from softlabels.inputs.tokens import token_fingerprint

            got = (token_fingerprint if isinstance(dataset, TokenDataset) else fingerprint)(dataset)
            if got != expected:
                raise FingerprintMismatch(f"dataset= (fingerprint {got[7:19]}) is not the data {store.path} was "
                                          f"generated from ({expected[7:19]}); pair the store with its own data")
        return
    if store.meta.positions == "tokens" or not len(rows):
        return
    labels = store.labels
    for i in np.unique(np.linspace(0, len(rows) - 1, _LABEL_CHECKS).round().astype(np.int64)):
        mine, theirs = _label(dataset[int(i)]), int(labels[rows[i]])
        if mine is not None and theirs >= 0 and mine != theirs:
            raise FingerprintMismatch(f"item {int(i)} of dataset= has label {mine} but {store.path} holds label "
                                      f"{theirs} for its sample id; pair the store generated from this dataset, "
                                      "or fix ids=")


def _check_tokens(item: Any, n: int, index: int, path: Any) -> None:
    ids = item.get("input_ids") if isinstance(item, dict) else item[0] if isinstance(item, (tuple, list)) else item
    if ids is None:
        raise DataError(f"item {index} of dataset= has no 'input_ids'; a token store pairs with items holding "
                        "input_ids (a dict) or the token ids themselves")
    mask = item.get("attention_mask") if isinstance(item, dict) else None
    got = int(np.asarray(mask).sum()) if mask is not None else len(ids)
    if got != n:
        raise DataError(f"item {index} of dataset= has {got} tokens but {path} holds {n} positions for its sample "
                        "id; tokenize as the store's data was (same tokenizer, seq_len and windows)")


# -- views ----------------------------------------------------------------------------------------------------------
def _choose(store: Any, sample_ids: np.ndarray, epoch: int) -> np.ndarray:
    from softlabels.store.positions.views import choose_views

    p = store.positions
    return choose_views(p.seed, sample_ids, epoch, p.num_views)


class _ByName:
    """The user's ``view_transform(item, params by name)`` (a class, so spawned workers can unpickle it)."""

    def __init__(self, fn: Callable[[Any, dict[str, float]], Any], names: tuple[str, ...]) -> None:
        self.fn, self.names = fn, names

    def __call__(self, item: Any, params: np.ndarray) -> Any:
        return self.fn(item, dict(zip(self.names, params.astype(float).tolist())))


class _Replay:
    """The store's own built-in augmentation applied to the item's input tensor (its first element)."""

    def __init__(self, spec: str) -> None:
        from softlabels.inputs.augment import parse_augment

        self.aug = parse_augment(spec) if spec else None

    def __call__(self, item: Any, params: np.ndarray) -> Any:
        if self.aug is None:
            return item
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise DataError(f"view_transform='replay' needs the item's input as a tensor, got {type(x).__name__}; "
                            "pass view_transform=f that applies the parameters to it")
        out = self.aug.apply(x.unsqueeze(0), torch.as_tensor(params, dtype=torch.float32).unsqueeze(0))[0]
        return (out, *item[1:]) if isinstance(item, (tuple, list)) else out


def _view_replay(store: Any, view_transform: Any) -> Callable[[Any, np.ndarray], Any]:
    """``(item, stored params) -> the item as that view``: the user's function or the store's own ops."""
    from softlabels.store.positions.views import refuse_code_terms

    p = store.positions
    if callable(view_transform):
        return _ByName(view_transform, tuple(p.param_names))
    if view_transform != "replay":
        raise ConfigError(f"{store.path} holds {p.num_views} augmented views per sample, each with its own target; "
                          "pass view_transform=f (called as f(item, params by name)) or view_transform='replay' "
                          "so each item is the view its target belongs to")
    refuse_code_terms(store.path, p.augment, "view_transform='replay' replays built-in ops only; pass "
                      "view_transform=f that applies it")
    return _Replay(p.augment)
