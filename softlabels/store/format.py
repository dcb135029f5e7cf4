"""The on-disk format, version 1: names, attributes, shapes, validation.

This module is the only place that knows the schema (docs/FORMAT.md describes it
for people). A store is one tree of arrays plus root attributes, identical in an
HDF5 file and a Zarr v3 group. Every per-row array is chunked along N only, with
``chunk_rows`` rows per chunk. New layouts (multi-view, ragged token logits) are
added by extending :func:`row_arrays`, not by changing the reader or writer.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Mapping

import numpy as np

from softlabels.errors import CorruptStore, StoreLimitExceeded, UnsupportedFormat

__all__ = [
    "FORMAT_VERSION",
    "LAYOUTS",
    "LOGITS_DTYPES",
    "ROW_KEYS",
    "ArraySpec",
    "StoreMeta",
    "chunk_checksum",
    "load_json",
    "encode_logits",
    "storage_dtype",
]

FORMAT_VERSION = 1

Layout = Literal["dense", "topk"]
LAYOUTS: tuple[str, ...] = ("dense", "topk")
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

# chunk checksum algorithms (root attribute "checksum"; absent means crc32, the first one)
CHECKSUM_ALGORITHMS: tuple[str, ...] = ("crc32", "crc32c")
NEW_STORE_CHECKSUM = "crc32c"  # hardware CRC: ~7x zlib.crc32 (docs/BENCHMARKS.md), same 32 bits

# logits dtype name -> numpy dtype it is stored as (bfloat16 as its raw uint16 bits)
LOGITS_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": np.dtype("uint16"),
}

# array names (the public contract)
LOGITS = "logits"
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
LOGSUMEXP = "logsumexp"
LABELS = "labels"
SAMPLE_IDS = "sample_ids"
CHUNK_DONE = "chunk_done"
CHECKSUMS = "checksums"

# every per-row array any layout may hold, in checksum order
ROW_KEYS: tuple[str, ...] = (LOGITS, TOPK_VALUES, TOPK_INDICES, LOGSUMEXP, LABELS, SAMPLE_IDS)

# Limits on what a store's own claims may make a reader do (docs/FORMAT.md, "Limits"): a store of a
# few KB can claim any shape, so every allocation sized by a claim is checked against these first.
MAX_JSON_BYTES = 16 << 20  # one metadata document (zarr.json, an HDF5 JSON attribute)
MAX_CHUNKS = 1 << 24  # chunks per store: bookkeeping is O(chunks) Python objects in places
READ_LIMIT_ENV = "SOFTLABELS_MAX_READ_BYTES"
DEFAULT_MAX_READ_BYTES = 1 << 30  # one read of one array into memory


def max_read_bytes() -> int:
    """The largest single array read a reader will allocate (``SOFTLABELS_MAX_READ_BYTES`` overrides)."""
    raw = os.environ.get(READ_LIMIT_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_READ_BYTES


def check_read_size(path: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse a read whose result would exceed :func:`max_read_bytes`, before allocating it."""
    nbytes = math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize
    limit = max_read_bytes()
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
    elif not (raw.strip() if isinstance(raw, str) else raw.strip()):
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


def load_json_file(path: Any, *, fix: str) -> Any:
    """:func:`load_json` of a file, reading at most one byte past the limit."""
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    return load_json(raw, where=repr(str(path)), fix=fix)


# root attributes whose values are objects (JSON strings in HDF5)
OBJECT_ATTRS: tuple[str, ...] = ("teacher", "source", "created_by")
# every object-valued attribute of any version: JSON strings in HDF5 (version 2 adds three)
JSON_ATTRS: tuple[str, ...] = (*OBJECT_ATTRS, "layout_params", "views", "tokens")
REQUIRED_ATTRS: tuple[str, ...] = (
    "softlabels_format", "status", "layout", "num_samples", "num_classes",
    "logits_dtype", "chunk_rows",
)


@dataclass(frozen=True)
class ArraySpec:
    """Shape and stored dtype of one array; ``per_row`` arrays are chunked along N."""

    shape: tuple[int, ...]
    dtype: np.dtype
    per_row: bool = True


@dataclass(frozen=True)
class StoreMeta:
    """Everything a store's root attributes say, validated."""

    layout: str
    num_samples: int
    num_classes: int
    logits_dtype: str = "float32"
    chunk_rows: int = 1024
    topk: int | None = None
    status: str = STATUS_WRITING
    teacher: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    created_by: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    checksum: str = NEW_STORE_CHECKSUM

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise CorruptStore("invalid store metadata: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency in these values (empty when valid)."""
        p: list[str] = []
        if not isinstance(self.layout, str) or self.layout not in LAYOUTS:
            p.append(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if not _is_int(self.num_samples) or self.num_samples < 0:
            p.append(f"num_samples must be an integer >= 0, got {self.num_samples!r}")
        if not _is_int(self.num_classes) or self.num_classes < 1:
            p.append(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if not isinstance(self.logits_dtype, str) or self.logits_dtype not in LOGITS_DTYPES:
            p.append(f"logits_dtype {self.logits_dtype!r} is not one of {', '.join(LOGITS_DTYPES)}")
        if not _is_int(self.chunk_rows) or self.chunk_rows < 1:
            p.append(f"chunk_rows must be an integer >= 1, got {self.chunk_rows!r}")
        if self.layout == "topk":
            if not _is_int(self.topk) or not 1 <= self.topk <= (self.num_classes if _is_int(self.num_classes) else 0):
                p.append(f"topk must be an integer in 1..num_classes, got {self.topk!r}")
        elif self.topk is not None:
            p.append("topk is set but the layout is not 'topk'")
        if not isinstance(self.status, str) or self.status not in (STATUS_WRITING, STATUS_COMPLETE):
            p.append(f"status {self.status!r} is not 'writing' or 'complete'")
        if not isinstance(self.checksum, str) or self.checksum not in CHECKSUM_ALGORITHMS:
            p.append(f"checksum {self.checksum!r} is not one of {', '.join(CHECKSUM_ALGORITHMS)}")
        if not p and self.num_chunks > MAX_CHUNKS:
            p.append(f"num_samples {self.num_samples} in chunks of {self.chunk_rows} rows make {self.num_chunks:,} "
                     f"chunks, over the limit of {MAX_CHUNKS:,}")
        return p

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_rows)

    @property
    def complete(self) -> bool:
        return self.status == STATUS_COMPLETE

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of chunk number ``chunk``."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range 0..{self.num_chunks - 1}")
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_samples)

    def row_arrays(self) -> dict[str, ArraySpec]:
        """The per-row arrays of this layout, in checksum order."""
        n, c = self.num_samples, self.num_classes
        values = LOGITS_DTYPES[self.logits_dtype]
        if self.layout == "dense":
            arrays = {LOGITS: ArraySpec((n, c), values)}
        else:
            k = int(self.topk)  # validated above
            arrays = {
                TOPK_VALUES: ArraySpec((n, k), values),
                TOPK_INDICES: ArraySpec((n, k), topk_index_dtype(c)),
                LOGSUMEXP: ArraySpec((n,), np.dtype("float32")),
            }
        arrays[LABELS] = ArraySpec((n,), np.dtype("int64"))
        arrays[SAMPLE_IDS] = ArraySpec((n,), np.dtype("int64"))
        return arrays

    def arrays(self) -> dict[str, ArraySpec]:
        """Every array of the store: per-row arrays plus the per-chunk bookkeeping."""
        per_chunk = {
            CHUNK_DONE: ArraySpec((self.num_chunks,), np.dtype("uint8"), per_row=False),
            CHECKSUMS: ArraySpec((self.num_chunks,), np.dtype("uint32"), per_row=False),
        }
        return {**self.row_arrays(), **per_chunk}

    def to_attrs(self) -> dict[str, Any]:
        """Root attributes as plain JSON-serialisable values."""
        attrs: dict[str, Any] = {
            "softlabels_format": self.format_version,
            "status": self.status,
            "layout": self.layout,
            "num_samples": int(self.num_samples),
            "num_classes": int(self.num_classes),
            "logits_dtype": self.logits_dtype,
            "chunk_rows": int(self.chunk_rows),
            "teacher": self.teacher,
            "source": self.source,
            "created_by": self.created_by,
            "checksum": self.checksum,
        }
        if self.layout == "topk":
            attrs["topk"] = int(self.topk)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreMeta:
        """Parse and validate root attributes (JSON data only, never evaluated)."""
        version = attrs.get("softlabels_format")
        if version is None:
            raise CorruptStore("root attribute 'softlabels_format' is missing; this is not a softlabels store or its metadata was damaged")
        if not _is_int(version) or version != FORMAT_VERSION:
            raise UnsupportedFormat(
                f"unsupported softlabels format version {version!r}; this softlabels reads versions 1 and 2 "
                "(upgrade softlabels or regenerate the store)"
            )
        missing = [a for a in REQUIRED_ATTRS if a not in attrs]
        if missing:
            raise CorruptStore(f"root attributes missing: {', '.join(missing)}; regenerate the store")
        objects = {}
        for name in OBJECT_ATTRS:
            value = attrs.get(name, {})
            if not isinstance(value, dict):
                raise CorruptStore(f"root attribute {name!r} must be an object, got {type(value).__name__}")
            objects[name] = value
        return cls(
            layout=attrs["layout"],
            num_samples=attrs["num_samples"],
            num_classes=attrs["num_classes"],
            logits_dtype=attrs["logits_dtype"],
            chunk_rows=attrs["chunk_rows"],
            topk=attrs.get("topk"),
            status=attrs["status"],
            format_version=version,
            checksum=attrs.get("checksum", "crc32"),  # stores from before the attribute use crc32
            **objects,
        )

    def with_status(self, status: str) -> StoreMeta:
        return replace(self, status=status)

    def same_shape(self, other: StoreMeta) -> list[str]:
        """Differences in what decides the arrays' shapes and types (for resume checks)."""
        keys = ("layout", "num_samples", "num_classes", "logits_dtype", "chunk_rows", "topk")
        return [f"{k}: {getattr(self, k)!r} != {getattr(other, k)!r}" for k in keys
                if getattr(self, k) != getattr(other, k)]


def topk_index_dtype(num_classes: int) -> np.dtype:
    """uint16 when every class index fits (C <= 65536), else int32."""
    return np.dtype("uint16") if num_classes <= 65536 else np.dtype("int32")


def storage_dtype(logits_dtype: str) -> np.dtype:
    """The numpy dtype logits of this kind are stored as."""
    return LOGITS_DTYPES[logits_dtype]


def encode_logits(values: Any, logits_dtype: str) -> np.ndarray:
    """Convert float logits (numpy or torch) to their stored representation."""
    import torch

    if isinstance(values, torch.Tensor):
        t = values.detach().cpu()
    else:
        arr = np.asarray(values)
        if logits_dtype == "bfloat16" and arr.dtype == np.uint16:
            return arr  # already bfloat16 bits
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if logits_dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, logits_dtype)).numpy()


def decode_logits(stored: np.ndarray, logits_dtype: str):
    """Stored logits as a torch tensor of the logical dtype (no copy)."""
    import torch

    t = torch.from_numpy(stored)
    if logits_dtype == "bfloat16":
        return t.view(torch.int16).view(torch.bfloat16)
    return t


def checksum_of(parts: Iterable[np.ndarray], algorithm: str = "crc32") -> int:
    """CRC (``crc32`` or ``crc32c``) chained over the bytes of ``parts``, in order."""
    if algorithm == "crc32c":
        import google_crc32c

        def update(crc: int, data: np.ndarray) -> int:
            return google_crc32c.extend(crc, data)
    else:
        def update(crc: int, data: np.ndarray) -> int:
            return zlib.crc32(data, crc)
    crc = 0
    for a in parts:
        crc = update(crc, _bytes(a))
    return crc


def chunk_checksum(block: Mapping[str, np.ndarray], algorithm: str = "crc32") -> int:
    """The CRC of a version-1 chunk: its per-row arrays in ROW_KEYS order."""
    return checksum_of((block[key] for key in ROW_KEYS if key in block), algorithm)


def _bytes(a: np.ndarray) -> np.ndarray:
    """A uint8 view of an array's bytes (no copy when it is contiguous, as whole-chunk rows are)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def encode_h5_attr(name: str, value: Any) -> Any:
    """HDF5 attribute value: objects as JSON strings, scalars as themselves."""
    return json.dumps(value, sort_keys=True) if name in JSON_ATTRS else value


def decode_h5_attr(name: str, value: Any) -> Any:
    """Inverse of :func:`encode_h5_attr`; parses JSON only (never evaluates)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if name in JSON_ATTRS and isinstance(value, str):
        return load_json(value, where=f"root attribute {name!r}", fix="regenerate the store")
    return value


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


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
