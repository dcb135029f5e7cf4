"""softlabels: offline knowledge distillation with precomputed teacher logits."""

from __future__ import annotations

__version__ = "0.1.0"

from softlabels.errors import SoftLabelsError  # noqa: E402
from softlabels.format import FORMAT_VERSION, StoreMeta  # noqa: E402
from softlabels.reader import SoftLabelStore, densify_topk, open_store, to_torch  # noqa: E402
from softlabels.writer import StoreWriter  # noqa: E402

__all__ = [
    "FORMAT_VERSION",
    "SoftLabelStore",
    "SoftLabelsError",
    "StoreMeta",
    "StoreWriter",
    "__version__",
    "densify_topk",
    "open_store",
    "to_torch",
]
