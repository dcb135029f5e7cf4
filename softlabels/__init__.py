"""softlabels: offline knowledge distillation with precomputed teacher logits.

The teacher job (:func:`generate`) writes raw logits into an HDF5 or Zarr v3 store
(:class:`StoreWriter`, :func:`open_store`; format in docs/FORMAT.md); students are
trained from stores (:class:`SoftLabelDataset`, :func:`train`) with KD losses
(:func:`make_soft_loss`, :class:`DistillationLoss`) and evaluated (:func:`evaluate`).

The names below are imported on first use (PEP 562), so ``import softlabels`` and
the command line's ``--help`` do not pay for torch, h5py and zarr.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any

from softlabels import _startup

_startup.begin()  # first: Ctrl-C while a command starts is one line (started as the CLI only)

from softlabels._version import __version__  # noqa: E402

# public name -> the module that defines it
_WHERE = {
    "ArrayDataset": "data", "InputDataset": "data", "fingerprint": "data",
    "SoftLabelDataset": "dataset", "SoftLabelMapDataset": "dataset", "batch_loader": "dataset",
    "SoftLabelsError": "errors",
    "evaluate": "evaluate", "load_student": "evaluate",
    "FORMAT_VERSION": "format", "StoreMeta": "format",
    "GenerateResult": "generate", "generate": "generate",
    "LOSSES": "losses", "DistillationLoss": "losses", "make_soft_loss": "losses",
    "EvalAccumulator": "metrics",
    "SoftLabelStore": "reader", "densify_topk": "reader", "open_store": "reader", "to_torch": "reader",
    "ModelInfo": "specs", "resolve_data": "specs", "resolve_model": "specs",
    "diff_stores": "summary", "summarize": "summary",
    "EvalConfig": "config", "GenerateConfig": "config", "TrainConfig": "config",
    "train": "train",
    "StoreWriter": "writer",
}
# functions that share their module's name: ``softlabels.generate`` stays the function
_SHADOWED = frozenset(name for name, module in _WHERE.items() if name == module)

__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'softlabels' has no attribute {name!r}")
    value = getattr(import_module(f"softlabels.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Importing ``softlabels.generate`` binds the module on the package; keep the function instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
