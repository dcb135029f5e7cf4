"""Layouts: how one position's teacher distribution is stored, decoded and scored.

A plain registry (mosaicml/streaming's ``_readers = {...}``): a new layout is one
module with a :class:`Layout` subclass and one entry in :data:`LAYOUTS`.

>>> layout = make_layout("topk", num_classes=1000, logits_dtype="float16", k=10)
>>> layout.bytes_per_position  # 10 fp16 values, 10 uint16 ids, one float32 logsumexp
44
"""

from __future__ import annotations

import dataclasses
from typing import Any

from softlabels.errors import ConfigError
from softlabels.store.layouts._base import (
    Layout,
    decode_ids,
    encode_ids,
    finite_rows,
    id_dtype,
    to_numpy,
)
from softlabels.store.layouts.dense import Dense
from softlabels.store.layouts.sampled import Sampled
from softlabels.store.layouts.targets import (
    DenseTarget,
    SampledTarget,
    Target,
    TopKTarget,
)
from softlabels.store.layouts.topk import TopK

__all__ = [
    "LAYOUTS", "Layout", "Dense", "TopK", "Sampled", "make_layout",
    "DenseTarget", "TopKTarget", "SampledTarget", "Target",
    "id_dtype", "encode_ids", "decode_ids", "finite_rows", "to_numpy",
]

LAYOUTS: dict[str, type[Layout]] = {"dense": Dense, "topk": TopK, "sampled": Sampled}


def make_layout(name: str, *, num_classes: int, logits_dtype: str = "float32", **params: Any) -> Layout:
    """The layout called ``name`` for C classes; ``params`` are its own (``k``; ``samples``, ``seed``).

    Raises :class:`ConfigError` for an unknown name or invalid parameters (every problem listed).
    """
    cls = LAYOUTS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    try:
        return cls(num_classes=num_classes, logits_dtype=logits_dtype, **params)
    except TypeError as err:  # a parameter this layout does not take
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("num_classes", "logits_dtype")]
        takes = ", ".join(names) or "no parameters besides num_classes and logits_dtype"
        raise ConfigError(f"{name} layout: {err}; it takes {takes}") from None
