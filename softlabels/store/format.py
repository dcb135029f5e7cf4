"""What every store shares, whatever its version: names, dtypes, checksums, limits, metadata JSON.

The limits on what a store's claims may make a reader allocate are docs/FORMAT.md's "Limits".
"""

from __future__ import annotations

import itertools
import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from softlabels.errors import CorruptStore, StoreLimitExceeded

__all__ = ["LOGITS_DTYPES", "ArraySpec", "checksum_of", "chunk_list", "load_json"]

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

# checksum algorithms (root attribute "checksum"; absent in a version-1 store means crc32, the first one)
CHECKSUM_ALGORITHMS: tuple[str, ...] = ("crc32", "crc32c")
NEW_STORE_CHECKSUM = "crc32c"  # hardware CRC: ~7x zlib.crc32 (docs/BENCHMARKS.md), same 32 bits

# logits dtype name -> numpy dtype it is stored as (bfloat16 as its raw uint16 bits)
LOGITS_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("float32"),
                                      "float16": np.dtype("float16"),
                                      "bfloat16": np.dtype("uint16")}

# array names (the public contract)
LOGITS = "logits"
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
LOGSUMEXP = "logsumexp"
LABELS = "labels"
SAMPLE_IDS = "sample_ids"

# Limits on what a store's own claims may make a reader do (docs/FORMAT.md, "Limits"): a store of a
# few KB can claim any shape, so every allocation sized by a claim is checked against these first.
MAX_JSON_BYTES = 16 << 20  # one metadata document (zarr.json, an HDF5 JSON attribute)
MAX_UNITS = 1 << 24  # write units (format 1: chunks) per store: bookkeeping is O(units) Python objects in places
READ_LIMIT_ENV = "SOFTLABELS_MAX_READ_BYTES"
DEFAULT_MAX_READ_BYTES = 1 << 30  # one read of one array into memory


def env_int(name: str, default: int, low: int = 1) -> int:
    """The environment variable ``name`` as an integer when it is one >= ``low``, else ``default``."""
    raw = os.environ.get(name, "")
    return int(raw) if raw.isascii() and raw.isdigit() and int(raw) >= low else default


def check_read_size(path: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse a read whose result would exceed ``SOFTLABELS_MAX_READ_BYTES``, before allocating it."""
    nbytes = math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize
    limit = env_int(READ_LIMIT_ENV, DEFAULT_MAX_READ_BYTES)
    if nbytes > limit:
        raise StoreLimitExceeded(
            f"reading {name} {tuple(int(n) for n in shape)} from {str(path)!r} would allocate {nbytes:,} bytes, over "
            f"the limit of {limit:,}; the store claims more data than is plausible: regenerate it, or if it really "
            f"is this large raise the limit with {READ_LIMIT_ENV}"
        )


def load_json(raw: bytes | str, *, where: str, fix: str) -> Any:
    """Parse one store-internal JSON document (data only, never evaluated); any damage -> CorruptStore.

    The single entry point for metadata JSON, so an empty, truncated, oversized, deeply nested
    or non-UTF-8 document is one line naming ``where`` and ``fix``, never a parser traceback.
    """
    if len(raw) > MAX_JSON_BYTES:
        reason = f"{len(raw):,} bytes, over the {MAX_JSON_BYTES:,}-byte limit for metadata"
    elif not raw.strip():
        reason = "empty"
    else:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            reason = f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        except UnicodeDecodeError:
            reason = "not UTF-8 text"
        except RecursionError:
            reason = "nested too deeply"
    raise CorruptStore(f"{where} is damaged ({reason}); {fix}")


@dataclass(frozen=True)
class ArraySpec:
    """Shape and stored dtype of one array (per position, or whole)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def checksum_of(parts: Iterable[np.ndarray], algorithm: str = "crc32") -> int:
    """CRC (``crc32`` or ``crc32c``) chained over the bytes of ``parts``, in order."""
    if algorithm == "crc32c":
        from google_crc32c import extend as update
    else:
        def update(crc: int, data: np.ndarray) -> int:
            return zlib.crc32(data, crc)
    crc = 0
    for a in parts:
        crc = update(crc, np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # no copy when contiguous
    return crc


def default_chunk_rows(num_classes: int, itemsize: int, target_bytes: int = 1 << 20) -> int:
    """A power of two giving ~1 MiB logits chunks, between 16 and 4096 rows."""
    rows = max(1, target_bytes // max(1, num_classes * itemsize))
    return int(min(4096, max(16, 1 << (rows.bit_length() - 1))))


def chunk_list(indices: Any, limit: int = 20) -> str:
    """'3, 7, 9' (at most ``limit`` numbers, then a count) for messages."""
    items = [int(i) for i in itertools.islice(indices, limit)]  # a hostile count must not be listed whole
    total = len(indices) if hasattr(indices, "__len__") else len(items)
    text = ", ".join(str(i) for i in items)
    return text + (f", ... ({total - limit} more)" if total > limit else "")


def is_int(x: Any) -> bool:
    """An integer (numpy's too), not a bool: what a JSON count must be."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
