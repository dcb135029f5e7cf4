"""Token datasets: packed [N, L] arrays, ragged flat tokens + offsets, and token windows.

Item ``i`` of a :class:`TokenDataset` is ``(ids int64 [L_i], mask bool [L_i])``, sample id ``i``;
its lengths are known without reading a token. ``mask[t]`` marks the targets (docs/TOKENS.md).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.errors import DataError
from softlabels.inputs.array_files import LazyArray, _array_names, file_kind, read_npz
from softlabels.inputs.fingerprints import spread_ids

__all__ = ["TokenBatch", "TokenDataset", "PackedTokens", "RaggedTokens",
           "check_seq_len", "open_token_file", "pack_stream", "token_fingerprint", "offsets_of", "window_offsets"]


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded sequences: ``ids`` int64 [B, Lmax] (pad 0), ``mask`` bool [B, Lmax]
    (False at padding), ``lengths`` int64 [B]. ``valid`` is True inside each sequence."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return torch.arange(self.ids.shape[1], device=self.lengths.device) < self.lengths[:, None]


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """``offsets`` [N + 1] (int64, starting at 0) of sequences with these lengths."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _pad(flat_ids: np.ndarray, flat_mask: np.ndarray, lengths: np.ndarray) -> TokenBatch:
    """Scatter concatenated sequences into a right-padded batch, without a Python loop."""
    b, width = lengths.size, int(lengths.max(initial=0))
    ids = np.zeros((b, width), dtype=np.int64)
    mask = np.zeros((b, width), dtype=bool)
    valid = np.arange(width) < lengths[:, None]  # row-major True cells = the concatenation's order
    ids[valid] = flat_ids
    mask[valid] = flat_mask
    return TokenBatch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(lengths.astype(np.int64)))


def _check_ids(ids: np.ndarray, source: str, where: str) -> np.ndarray:
    if ids.size and ids.min() < 0:
        raise DataError(f"{source} has negative token id {int(ids.min())} in {where}; store token ids >= 0 in an "
                        "integer type wide enough for the vocabulary (int16 wraps above 32,767)")
    return ids.astype(np.int64, copy=False)


class TokenDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style dataset of token sequences; subclasses set ``_lengths`` and implement ``_read(indices)``.
    ``vocab_size``: the tokenizer's, or None; ``has_mask``: False when every token is a target."""

    vocab_size: int | None = None
    has_mask: bool = False
    source: str = "tokens"
    _lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths().size)

    def lengths(self) -> np.ndarray:
        """Tokens per sequence, int64 [N], without reading any token."""
        return self._lengths

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated ids and mask of ``indices`` (in that order)."""
        raise NotImplementedError

    def get_batch(self, indices: np.ndarray) -> TokenBatch:
        """Sequences ``indices`` (any order, repeats allowed), right-padded."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices out of range for a dataset of {n} sequences")
        ids, mask = self._read(idx)
        return _pad(_check_ids(ids, self.source, f"sequences {idx.min(initial=0)}..{idx.max(initial=0)}"),
                    mask, self.lengths()[idx])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(index)
        batch = self.get_batch(np.array([i + len(self) if i < 0 else i]))
        return batch.ids[0], batch.mask[0]


def _check_mask(mask: Any, shape: tuple[int, ...], source: str) -> None:
    integer = np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_
    if tuple(mask.shape) != shape or not integer:
        raise DataError(f"mask of {source} has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                        f"store a bool (or 0/1) array shaped like the tokens, {shape}")


class PackedTokens(TokenDataset):
    """Sequences of one length: ``tokens`` [N, L] (e.g. a memory-mapped ``.npy``), optional ``mask``."""

    def __init__(self, tokens: Any, mask: Any = None, *, source: str = "tokens",
                 vocab_size: int | None = None) -> None:
        self.source, self.vocab_size = source, vocab_size
        dtype = np.dtype(tokens.dtype)
        if len(tokens.shape) != 2 or not np.issubdtype(dtype, np.integer) or 0 in tokens.shape:
            raise DataError(f"tokens of {source} have shape {tuple(tokens.shape)} and dtype {dtype}; "
                            "store integer token ids, [N, L] with N, L >= 1 (or flat tokens with offsets [N + 1])")
        if mask is not None:
            _check_mask(mask, tuple(tokens.shape), source)
        self._tokens, self._mask, self.has_mask = tokens, mask, mask is not None
        self._lengths = np.full(tokens.shape[0], tokens.shape[1], dtype=np.int64)
        self._lengths.flags.writeable = False

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self._tokens[indices]).reshape(-1)
        mask = np.ones(ids.size, bool) if self._mask is None else np.asarray(self._mask[indices]).reshape(-1) != 0
        return ids, mask


def _spans(array: Any, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``concat(array[a:b] for a, b)``, from one slab read when the spans cover a quarter of their
    hull (a random small read from HDF5/Zarr costs ~1 ms)."""
    if starts.size == 0:
        return np.empty(0, dtype=array.dtype)
    lo, hi = int(starts.min()), int(stops.max())
    total = int((stops - starts).sum())
    if 4 * total >= hi - lo:
        lengths = stops - starts
        at = np.arange(total) + np.repeat(starts - lo - offsets_of(lengths)[:-1], lengths)
        return np.asarray(array[lo:hi])[at]
    return np.concatenate([np.asarray(array[a:b]) for a, b in zip(starts.tolist(), stops.tolist())])


class RaggedTokens(TokenDataset):
    """Sequences of any length: flat ``tokens`` [T], ``offsets`` [N + 1], optional flat ``mask``
    [T]; sequence ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``. ``offsets`` are read (and checked)
    now."""

    def __init__(self, tokens: Any, offsets: Any, mask: Any = None, *, source: str = "tokens",
                 vocab_size: int | None = None) -> None:
        self.source, self.vocab_size = source, vocab_size
        dtype = np.dtype(tokens.dtype)
        if len(tokens.shape) != 1 or not np.issubdtype(dtype, np.integer):
            raise DataError(f"tokens of {source} have shape {tuple(tokens.shape)} and dtype {dtype}; "
                            "with offsets, store the token ids flat: one integer array [T]")
        off = np.asarray(offsets[...])
        total = int(tokens.shape[0])
        if (off.ndim != 1 or off.size < 2 or not np.issubdtype(off.dtype, np.integer)
                or off[0] != 0 or off[-1] != total or (np.diff(off) < 0).any()):
            raise DataError(f"offsets of {source} are not [N + 1] integers rising from 0 to the {total} tokens; "
                            "store offsets[i]..offsets[i + 1] as sequence i's token range")
        self._lengths = np.diff(off).astype(np.int64)
        if (self._lengths == 0).any():
            raise DataError(f"sequence {int(np.argmin(self._lengths))} of {source} is empty; drop empty sequences "
                            "(every sequence needs at least one token)")
        if mask is not None:
            _check_mask(mask, (total,), source)
        self._tokens, self._mask, self.has_mask = tokens, mask, mask is not None
        self._offsets = off.astype(np.int64)
        self._lengths.flags.writeable = self._offsets.flags.writeable = False

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts, stops = self._offsets[indices], self._offsets[indices + 1]
        ids = _spans(self._tokens, starts, stops)
        mask = np.ones(ids.size, bool) if self._mask is None else _spans(self._mask, starts, stops) != 0
        return ids, mask


def check_seq_len(seq_len: Any) -> int:
    """``seq_len`` as an int, refused unless it is an integer >= 1."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise DataError(f"seq_len must be an integer >= 1, got {seq_len!r}; pass e.g. --seq-len 256")
    return int(seq_len)


def window_offsets(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """``offsets`` of consecutive windows of ``seq_len`` tokens cut from each sequence of these
    ``lengths``: a sequence's last window keeps its remainder, and no window crosses two sequences."""
    seq_len = check_seq_len(seq_len)
    lengths = np.asarray(lengths, dtype=np.int64)
    per = -(-lengths // seq_len)  # windows per sequence
    windows = np.full(int(per.sum()), seq_len, dtype=np.int64)
    windows[np.cumsum(per) - 1] = lengths - seq_len * (per - 1)
    return offsets_of(windows)


def pack_stream(stream: Any, seq_len: int, mask: Any = None, *, source: str = "tokens",
                vocab_size: int | None = None) -> TokenDataset:
    """Cut a 1-D token stream (an array or memmap, not copied) and its optional flat mask
    into consecutive ``seq_len`` windows; the last may be shorter."""
    if len(stream.shape) != 1 or stream.shape[0] == 0:
        raise DataError(f"{source} holds no tokens; pass a non-empty text or token stream")
    offsets = window_offsets(np.array([stream.shape[0]]), seq_len)
    return RaggedTokens(stream, offsets, mask, source=source, vocab_size=vocab_size)


class _FlatRows:
    """A 2-D array ``[N, L]`` read as its row-major flat ``[N * L]``, by slices of whole rows
    (a memmap, an HDF5 or a Zarr array stays in its file)."""

    def __init__(self, array: Any) -> None:
        self.array, self.width = array, int(array.shape[1])
        self.shape, self.dtype = (int(array.shape[0]) * self.width,), np.dtype(array.dtype)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.shape[0])
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first, last = start // self.width, -(-stop // self.width)
        rows = np.asarray(self.array[first:last]).reshape(-1)
        return rows[start - first * self.width:stop - first * self.width]


def _rewindow(ds: TokenDataset, tokens: Any, mask: Any, seq_len: int, path: str) -> TokenDataset:
    """``ds`` (packed rows or ragged sequences, each a document) cut into windows of at most
    ``seq_len``; packed rows of exactly ``seq_len`` tokens stay as they are."""
    if isinstance(ds, PackedTokens):
        if seq_len == tokens.shape[1]:
            return ds
        tokens, mask = _FlatRows(tokens), None if mask is None else _FlatRows(mask)
    return RaggedTokens(tokens, window_offsets(ds.lengths(), seq_len), mask, source=path)


def open_token_file(path: str | os.PathLike[str], *, seq_len: int | None = None) -> TokenDataset:
    """Token ids in a file: ``.npy`` ([N, L] packed, or a 1-D stream cut into ``seq_len`` windows),
    or ``.npz``/HDF5/Zarr with array ``tokens`` and optional ``offsets``, ``mask``. ``seq_len`` cuts
    held sequences into windows of at most ``seq_len`` (rows of exactly ``seq_len`` stay as they
    are)."""
    path = str(path)
    kind = file_kind(path, "token file", ".npy, .npz, .h5/.hdf5 or .zarr")
    arrays: dict[str, Any]
    if kind == "npy":
        arrays = {"tokens": np.load(path, mmap_mode="r", allow_pickle=False)}
    elif kind == "npz":
        arrays = read_npz(path)
    else:
        found = _array_names(path, kind)
        arrays = {name: LazyArray(path, kind, name) for name in ("tokens", "offsets", "mask") if name in found}
    if "tokens" not in arrays:
        raise DataError(f"no array 'tokens' in '{path}'; arrays found: {', '.join(arrays) or '(none)'}; "
                        "store token ids as 'tokens' (with 'offsets' [N + 1] if ragged, and an optional 'mask')")
    tokens, offsets, mask = arrays["tokens"], arrays.get("offsets"), arrays.get("mask")
    if offsets is None and len(tokens.shape) == 1:
        if seq_len is None:
            raise DataError(f"'{path}' holds flat tokens without offsets; store 'offsets' [N + 1] beside them, "
                            "or pass --seq-len to cut the stream into windows")
        return pack_stream(tokens, seq_len, mask, source=path)
    ds = PackedTokens(tokens, mask, source=path) if offsets is None else RaggedTokens(tokens, offsets, mask, source=path)
    return ds if seq_len is None else _rewindow(ds, tokens, mask, seq_len, path)


def token_fingerprint(ds: TokenDataset) -> str:
    """Cheap, content-sensitive fingerprint ``"sha256:<hex>"`` of token data: every sequence length,
    and the ids and mask of the sequences :func:`~softlabels.inputs.fingerprints.spread_ids` picks.
    """
    lengths = ds.lengths()
    n = lengths.size
    digest = hashlib.sha256()
    digest.update(f"softlabels-token-fingerprint-v1|n={n}|".encode())
    digest.update(np.ascontiguousarray(lengths, dtype="<i8").tobytes())
    if n:
        batch = ds.get_batch(spread_ids(n))
        digest.update(np.ascontiguousarray(batch.ids.numpy(), dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(batch.mask.numpy(), dtype="u1").tobytes())
    return f"sha256:{digest.hexdigest()}"
