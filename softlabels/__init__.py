"""softlabels: offline knowledge distillation with precomputed teacher outputs.

One package per pipeline stage (docs/ARCHITECTURE.md); stored targets in your own loop:
:func:`with_targets`, :func:`collate`, :func:`kd_loss` (docs/LIBRARY.md). The names below are
imported on first use (PEP 562), so ``import softlabels`` and ``--help`` do not pay for torch,
h5py and zarr.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from softlabels._runtime import signals as _signals

_signals.begin()  # first: Ctrl-C while a command starts is one line (started as the CLI only)

from softlabels._version import __version__  # noqa: E402

# public name -> the module that defines it
_WHERE = {
    "ArrayDataset": "inputs.arrays", "InputDataset": "inputs.arrays", "fingerprint": "inputs.fingerprints",
    "resolve_data": "inputs.spec",
    "SoftLabelDataset": "student.dataset", "SoftLabelMapDataset": "student.dataset",
    "batch_loader": "student.dataset",
    "SoftLabelsError": "errors",
    "evaluate": "evaluation.evaluator", "load_student": "evaluation.evaluator",
    "StoreMetaV2": "store.schema", "UnitStore": "store.reader", "open_store": "store.reader",
    "UnitWriter": "store.writer",
    "GenerateResult": "teacher.runner", "generate": "teacher.job", "merge": "teacher.merging",
    "upgrade": "teacher.merging",
    "LOSSES": "student.losses", "DistillationLoss": "student.losses", "make_soft_loss": "student.losses",
    "EvalAccumulator": "student.metrics",
    "ModelInfo": "teacher.spec", "resolve_model": "teacher.spec",
    "diff_stores": "store.summary", "summarize": "store.summary",
    "EvalConfig": "evaluation.config", "GenerateConfig": "teacher.config", "TrainConfig": "student.config",
    "train": "student.trainer",
    "with_targets": "library.pairing", "TargetDataset": "library.pairing",
    "collate": "library.batches", "TokenTargets": "library.batches", "PairedItems": "library.batches",
    "DenseTarget": "store.layouts.targets", "TopKTarget": "store.layouts.targets",
    "SampledTarget": "store.layouts.targets",
    "kd_loss": "library.losses", "KDLoss": "library.losses", "kl_loss": "library.losses",
    "soft_ce_loss": "library.losses", "mse_loss": "library.losses", "topk_kl_loss": "library.losses",
    "sampled_kl_loss": "library.losses", "reverse_kl_loss": "library.losses", "skew_kl_loss": "library.losses",
    "skew_reverse_kl_loss": "library.losses", "jsd_loss": "library.losses",
}

__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'softlabels' has no attribute {name!r}")
    value = getattr(import_module(f"softlabels.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
