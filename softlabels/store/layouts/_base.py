"""What every layout shares: the layout interface, id widths, stored logits, finite checks.

A layout stores, encodes, decodes and describes one position's teacher distribution over
C classes (docs/LAYOUTS.md); labels, sample ids and bookkeeping belong to the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from torch import Tensor

from softlabels.errors import ConfigError, CorruptStore, ModelMismatch
from softlabels.store import format as fmt
from softlabels.store.format import is_int as _is_int

__all__ = ["Layout", "id_dtype", "encode_ids", "decode_ids", "unpack_ids", "finite_rows",
           "to_numpy", "row_chunks"]

# Largest class count a packed 3-byte id holds; above it ids are uint32 (no cap below 2**32).
_UINT16_CLASSES = 1 << 16
_UINT24_CLASSES = 1 << 24
_UINT32_CLASSES = 1 << 32
_TORCH_LOGITS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def id_dtype(num_classes: int) -> tuple[np.dtype, tuple[int, ...]]:
    """Stored dtype and trailing shape of class ids for C classes: the fewest bits that hold C.

    uint16 when C <= 65,536; three little-endian bytes (uint8 [..., 3]) when
    C <= 2**24 (17-24 bit vocabularies: 1 byte less than uint32 per id); uint32 above.
    """
    if num_classes <= _UINT16_CLASSES:
        return np.dtype("uint16"), ()
    if num_classes <= _UINT24_CLASSES:
        return np.dtype("uint8"), (3,)
    return np.dtype("uint32"), ()


def encode_ids(ids: Tensor, num_classes: int) -> Tensor:
    """int64 class ids -> their stored form (a torch tensor on the same device)."""
    dtype, tail = id_dtype(num_classes)
    if tail:  # packed 3 bytes, little-endian: byte j holds bits 8j..8j+7
        shifts = torch.tensor([0, 8, 16], device=ids.device, dtype=torch.int64)
        return ((ids.long().unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)
    return ids.to(torch.uint16 if dtype == np.uint16 else torch.uint32)


def unpack_ids(stored: np.ndarray) -> np.ndarray:
    """Stored class ids with packed 3-byte ids widened to uint32 (other forms as they are)."""
    if stored.dtype == np.uint8 and stored.ndim and stored.shape[-1] == 3:
        # pad each id to 4 bytes and view as little-endian uint32: one vectorised copy
        wide = np.zeros(stored.shape[:-1] + (4,), np.uint8)
        wide[..., :3] = stored
        return wide.view("<u4")[..., 0]
    return stored


def decode_ids(stored: np.ndarray) -> Tensor:
    """Stored class ids (any of the forms above, or v1's int32) -> int64 torch ids."""
    return torch.from_numpy(unpack_ids(stored).astype(np.int64, copy=False))


def to_numpy(t: Tensor) -> np.ndarray:
    """CPU tensor -> numpy without copying (bfloat16 as its uint16 bits, the stored form)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def finite_rows(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool [B]: every stored float of the row is finite (NaN/inf logits, or overflow of a 16-bit store).

    numpy on the bits, not torch: this runs on the writer thread, where a torch op
    would start a second OpenMP team and slow the teacher's own ops down.
    """
    ok = np.ones(len(next(iter(arrays.values()))) if arrays else 0, bool)
    for name, a in arrays.items():
        if a.dtype == np.uint16 and name not in _BF16_ARRAYS:
            continue  # uint16 ids
        if a.dtype in (np.uint16, np.float16):
            # on the bits (np.isfinite on float16 is 8x slower): non-finite when the exponent is all ones,
            # i.e. the bits without the sign are >= those of inf; one row maximum, no bool temporary
            inf = 0x7F80 if a.dtype == np.uint16 else 0x7C00  # bfloat16 bits, float16
            bits = np.bitwise_and(a.view(np.uint16), 0x7FFF).reshape(len(a), math.prod(a.shape[1:]))
            rows = bits.max(axis=1, initial=0) < inf
        elif a.dtype.kind == "f" and name in _NEG_INF_OK:  # -inf: an empty tail, a valid value
            rows = ~(np.isnan(a) | np.isposinf(a)).reshape(len(a), math.prod(a.shape[1:])).any(axis=1)
        elif a.dtype.kind == "f":
            rows = np.isfinite(a).reshape(len(a), math.prod(a.shape[1:])).all(axis=1)
        else:
            continue
        ok &= rows
    return ok


# arrays whose uint16 dtype means bfloat16 logits (ids are uint16 too)
_BF16_ARRAYS = frozenset({fmt.LOGITS, fmt.TOPK_VALUES, "sampled_logits"})
# float arrays where -inf is a value (the logsumexp of an empty top-k tail), NaN and +inf are not
_NEG_INF_OK = frozenset({"tail_logsumexp"})


def row_chunks(rows: int, cols: int, budget: int = 1 << 23) -> list[slice]:
    """Row slices of about ``budget`` elements each, so a [rows, cols] temporary stays bounded."""
    step = max(1, budget // max(1, cols))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


@dataclass(frozen=True)
class Layout:
    """One layout, configured for a store: C classes and the stored logits dtype.

    Subclasses set ``name`` and ``default_loss`` and implement the methods below.
    """

    num_classes: int
    logits_dtype: str = "float32"

    name: ClassVar[str] = ""
    default_loss: ClassVar[str] = ""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError([f"{self.name} layout: {p}" for p in problems])

    def problems(self) -> list[str]:
        """Every invalid parameter (empty when valid)."""
        p = []
        if not _is_int(self.num_classes) or not 1 <= self.num_classes <= _UINT32_CLASSES:
            p.append(f"num_classes must be an integer in 1..{_UINT32_CLASSES}, got {self.num_classes!r}")
        if self.logits_dtype not in fmt.LOGITS_DTYPES:
            p.append(f"unknown logits dtype {self.logits_dtype!r}; use one of {', '.join(fmt.LOGITS_DTYPES)}")
        return p

    # -- arrays ---------------------------------------------------------------------------------
    def arrays(self) -> dict[str, fmt.ArraySpec]:
        """Per-position arrays in checksum order: shape *without* the leading position axis."""
        raise NotImplementedError

    @property
    def bytes_per_position(self) -> int:
        return sum(math.prod(s.shape) * s.dtype.itemsize for s in self.arrays().values())

    @property
    def store_dtype(self) -> torch.dtype:
        """The torch dtype stored logits have on the device (bfloat16 is written as its bits)."""
        return _TORCH_LOGITS[self.logits_dtype]

    def params(self) -> dict[str, Any]:
        """What a store records to rebuild this layout (besides num_classes and logits_dtype): the
        keyword arguments of :func:`softlabels.store.layouts.make_layout`, so a store's ``layout_params`` round-trip."""
        return {}

    def temperatures(self) -> tuple[float, ...] | None:
        """The distillation temperatures this layout's stores answer exactly; ``None``: every T (dense)."""
        return None

    temperature_kind: ClassVar[str] = ""  # why a T is refused (softlabels.store.temperatures)

    def validate(self, block: Mapping[str, np.ndarray]) -> list[str]:
        """Problems with stored content (shapes, dtypes, ids < C, ...); empty when valid."""
        p = []
        for key, spec in self.arrays().items():
            a = block.get(key)
            if a is None:
                p.append(f"array {key!r} is missing")
            elif a.dtype != spec.dtype or a.shape[1:] != spec.shape:
                p.append(f"{key} has dtype {a.dtype} and per-position shape {a.shape[1:]}, expected "
                         f"{spec.dtype} {spec.shape}")
        return p

    def check(self, block: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`CorruptStore` naming every problem :meth:`validate` finds."""
        problems = self.validate(block)
        if problems:
            raise CorruptStore(f"stored {self.name} arrays are invalid: {'; '.join(problems)}; regenerate the store")

    def _check_ids(self, p: list[str], key: str, block: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> None:
        a = block.get(key)
        if a is None or p:
            return
        ids = decode_ids(a).numpy()
        if mask is not None:
            ids = ids[mask]
        if ids.size and int(ids.max()) >= self.num_classes:
            p.append(f"{key} holds class id {int(ids.max())} but there are {self.num_classes} classes")

    # -- encode / decode ------------------------------------------------------------------------
    def _check_logits(self, logits: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ModelMismatch(f"teacher logits have shape {tuple(logits.shape)}, the {self.name} layout "
                                f"expects [batch, {self.num_classes}]; size the teacher for the store's classes")

    def encode(self, logits: Tensor, *, sample_ids: Tensor | None = None, positions: Tensor | None = None
               ) -> dict[str, Tensor]:
        """Raw teacher logits [B, C] -> this layout's arrays as torch tensors in stored dtypes, on their device."""
        raise NotImplementedError

    def decode(self, block: Mapping[str, np.ndarray]) -> Any:
        """Stored numpy arrays [B, ...] -> the layout's typed target (torch, no copy where possible)."""
        raise NotImplementedError

    def nonfinite_rows(self, block: Mapping[str, np.ndarray]) -> np.ndarray:
        """Indices of rows holding a NaN or inf value."""
        return np.flatnonzero(~finite_rows({k: block[k] for k in self.arrays() if k in block}))

    def inspect(self, target: Any) -> dict[str, Tensor]:
        """Per-row statistics for ``softlabels inspect`` (average them over rows)."""
        raise NotImplementedError

    def _decode_logits(self, stored: np.ndarray) -> Tensor:
        """Stored logits as a torch tensor of the logical dtype (no copy)."""
        t = torch.from_numpy(stored)
        return t.view(torch.int16).view(torch.bfloat16) if self.logits_dtype == "bfloat16" else t
