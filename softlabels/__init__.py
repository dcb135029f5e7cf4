"""softlabels: offline knowledge distillation with precomputed teacher logits.

The teacher job (:func:`generate`) writes raw logits into an HDF5 or Zarr v3 store
(:class:`StoreWriter`, :func:`open_store`; format in docs/FORMAT.md); students are
trained from stores (:class:`SoftLabelDataset`, :func:`train`) with KD losses
(:func:`make_soft_loss`, :class:`DistillationLoss`) and evaluated (:func:`evaluate`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from softlabels import _startup

_startup.begin()  # before the slow imports below: Ctrl-C there is one line (started as the CLI only)

# ruff: noqa: E402  (the version must exist before the modules that record it are imported)
from softlabels.data import ArrayDataset, InputDataset, fingerprint
from softlabels.dataset import SoftLabelDataset, SoftLabelMapDataset
from softlabels.errors import SoftLabelsError
from softlabels.evaluate import evaluate, load_student
from softlabels.format import FORMAT_VERSION, StoreMeta
from softlabels.generate import GenerateResult, generate
from softlabels.losses import LOSSES, DistillationLoss, make_soft_loss
from softlabels.metrics import EvalAccumulator
from softlabels.reader import SoftLabelStore, densify_topk, open_store, to_torch
from softlabels.specs import ModelInfo, resolve_data, resolve_model
from softlabels.summary import diff_stores, summarize
from softlabels.train import TrainConfig, train
from softlabels.writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "LOSSES",
    "ArrayDataset",
    "DistillationLoss",
    "EvalAccumulator",
    "GenerateResult",
    "InputDataset",
    "ModelInfo",
    "SoftLabelDataset",
    "SoftLabelMapDataset",
    "SoftLabelStore",
    "SoftLabelsError",
    "StoreMeta",
    "StoreWriter",
    "TrainConfig",
    "__version__",
    "densify_topk",
    "diff_stores",
    "evaluate",
    "fingerprint",
    "generate",
    "load_student",
    "make_soft_loss",
    "open_store",
    "resolve_data",
    "resolve_model",
    "summarize",
    "to_torch",
    "train",
]
