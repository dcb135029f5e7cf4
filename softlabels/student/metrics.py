"""Streaming evaluation metrics for a student, optionally against its teacher.

:class:`EvalAccumulator` moves each batch to the CPU in float64 and keeps only running sums: a whole
split costs O(C) memory, and how it is cut into batches changes the results only by rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softlabels.errors import ConfigError, DataError, ModelMismatch
from softlabels.inputs.arrays import InputDataset
from softlabels.store.layouts.targets import DenseTarget, TopKTarget
from softlabels.student import kd
from softlabels.student.lm_metrics import CalibrationBins, Sums
from softlabels.student.losses import Batch, KLDivergence, as_target

__all__ = ["EvalAccumulator"]

Metrics = dict[str, float | int | None]


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, over rows where both vary."""
    # Exact "does the row vary" test: centring a constant row can leave rounding noise.
    varies = (a.amax(-1) > a.amin(-1)) & (b.amax(-1) > b.amin(-1))
    a = a[varies] - a[varies].mean(-1, keepdim=True)
    b = b[varies] - b[varies].mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


class EvalAccumulator:
    """Accumulates accuracy, calibration and teacher-agreement metrics: :meth:`update` per batch, then
    :meth:`compute`, whose keys are

    * ``n``, ``n_labeled`` (label >= 0), and over the labeled rows (None without) ``accuracy`` and ``ece``
      (:class:`~.lm_metrics.CalibrationBins`); ``nonfinite_rows`` once a row of student logits held NaN/inf (it
      counts as wrong and stays out of the bins);
    * once a batch carried a teacher target: ``agreement`` (top-1), ``kl_to_teacher`` (mean KL(teacher ||
      student) at T = 1; for top-k and sampled targets over the stored ids plus one tail bucket, a lower
      bound), ``teacher_accuracy`` (top-1: top-k's first stored index, sampled's most drawn) and
      ``correlation`` (mean per-row Pearson correlation of the logits: all C for dense, the K stored for
      top-k; rows where either is constant are skipped, and the key is absent if all were);
    * once a batch carried dense teacher logits: ``teacher_ece``.
    """

    def __init__(self, num_classes: int, n_bins: int = 15) -> None:
        problems = []
        if not (isinstance(num_classes, int) and num_classes >= 1):
            problems.append(f"num_classes must be a positive integer, got {num_classes!r}")
        if not (isinstance(n_bins, int) and n_bins >= 1):
            problems.append(f"n_bins must be a positive integer, got {n_bins!r}; the usual choice is 15")
        if problems:
            raise ConfigError(problems)
        self.num_classes = num_classes
        self.n_bins = n_bins
        self._sums = Sums()
        self._bins = {who: CalibrationBins(n_bins) for who in ("student", "teacher")}  # the teacher's: dense only

    def update(self, student_logits: Tensor, labels: Tensor, batch: Batch | None = None) -> None:
        """Add a batch: student logits [B, C], labels [B] (-1 = unlabeled), teacher targets in ``batch``."""
        s = student_logits.detach().to("cpu", torch.float64)
        y = labels.detach().to("cpu", torch.int64)
        if s.ndim != 2 or s.shape[1] != self.num_classes or y.shape != s.shape[:1]:
            raise ModelMismatch(
                f"student logits {tuple(s.shape)} and labels {tuple(y.shape)} do not fit "
                f"[B, {self.num_classes}] and [B]; build the accumulator with the student's class count"
            )
        if y.numel() and not (y.min() >= -1 and y.max() < self.num_classes):
            raise DataError(f"labels must lie in [-1, {self.num_classes}); check the dataset's label column")
        labeled = y >= 0
        # A NaN/inf row has no prediction: torch's argmax would still name a class (and an all-NaN
        # student could score 100%), so such rows count as wrong and stay out of the calibration bins.
        finite = torch.isfinite(s).all(-1)
        sums = self._sums
        sums.add(n=len(y), n_labeled=labeled.sum(), nonfinite=(~finite).sum(),
                 correct=((s.argmax(-1) == y) & finite)[labeled].sum())
        self._add_bins("student", s, y, labeled & finite)

        target = None if batch is None else as_target(batch)
        if target is None:
            return
        target = dataclasses.replace(target, **{  # on the CPU in float64, ids int64 (temperatures stay numbers)
            f.name: v.detach().to("cpu", torch.float64 if v.is_floating_point() else torch.int64)
            for f in dataclasses.fields(target) for v in (getattr(target, f.name),) if isinstance(v, Tensor)})
        t_top = target.top1()
        sums.add(n_teacher=len(y), n_teacher_labeled=labeled.sum(),
                 teacher_correct=(t_top == y)[labeled].sum(), agree=(s.argmax(-1) == t_top).sum())
        if isinstance(target, DenseTarget):
            sums.add(kl=KLDivergence(1.0)(s, target).sum(), n_dense=len(y))
            corr = _pearson_rows(s, target.logits)
            self._add_bins("teacher", target.logits, y, labeled)
        else:  # over the stored ids plus one tail bucket: a lower bound of the full KL (at a T the store answers)
            kl, self.kl_temperature = kd.reported_kl(s, target)
            sums["kl"] += float(kl.sum()) if kl is not None else math.nan
            corr = _pearson_rows(s.gather(1, target.ids), target.values) if isinstance(target, TopKTarget) \
                else s.new_zeros(0)
        sums.add(corr=corr.sum(), n_corr=len(corr))

    def _add_bins(self, who: str, logits: Tensor, y: Tensor, labeled: Tensor) -> None:
        conf, pred = F.softmax(logits[labeled], -1).max(-1)
        self._bins[who].add(conf, (pred == y[labeled]).double())

    def compute(self) -> Metrics:
        """The metrics so far (see the class docstring for keys and when they are absent)."""
        sums = self._sums
        nl = sums["n_labeled"]
        out: Metrics = {"n": int(sums["n"]),
                        "n_labeled": int(nl),
                        "accuracy": sums["correct"] / nl if nl else None,
                        "ece": self._bins["student"].ece()}
        if sums["nonfinite"]:
            out["nonfinite_rows"] = int(sums["nonfinite"])
        if sums["n_teacher"]:
            ntl = sums["n_teacher_labeled"]
            out["teacher_accuracy"] = sums["teacher_correct"] / ntl if ntl else None
            out["agreement"] = sums["agree"] / sums["n_teacher"]
            kl = sums["kl"] / sums["n_teacher"]
            out["kl_to_teacher"] = None if math.isnan(kl) else kl  # None: an ids-only sampled store cannot say
            if getattr(self, "kl_temperature", 1.0) not in (1.0, None):
                out["kl_to_teacher_temperature"] = self.kl_temperature
            if sums["n_corr"]:
                out["correlation"] = sums["corr"] / sums["n_corr"]
        if sums["n_dense"]:
            out["teacher_ece"] = self._bins["teacher"].ece()
        return out

    def reliability(self, teacher: bool = False) -> dict[str, list]:
        """Reliability-diagram data per confidence bin, for the student (or the dense teacher): see
        :meth:`~.lm_metrics.CalibrationBins.reliability` (``count``: labeled rows in the bin)."""
        return self._bins["teacher" if teacher else "student"].reliability()


def _batches_from_data(dataset: InputDataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        idx = np.arange(start, min(start + batch_size, len(dataset)), dtype=np.int64)
        x, y = dataset.get_batch(idx)
        yield {"x": x, "labels": y}


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: InputDataset, *, num_classes: int, batch_size: int = 512,
                   device: str | torch.device = "cpu", store: Any = None,
                   acc: EvalAccumulator | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` (see :class:`EvalAccumulator`), against ``store`` if given.

    ``acc``: the accumulator to add the batches to (for its :meth:`~EvalAccumulator.reliability`, say)."""
    acc = acc or EvalAccumulator(num_classes)
    was_training = model.training
    model.eval()
    try:
        if store is None:
            batches: Any = _batches_from_data(dataset, batch_size)
        else:  # in order, one rank: every row once, joined by sample_ids, the data's fingerprint checked
            from softlabels.student.dataset import SoftLabelDataset

            batches = SoftLabelDataset([(store, dataset)], batch_size=batch_size, shuffle=False, rank=0, world_size=1)
        for batch in batches:
            logits = model(batch["x"].to(device, non_blocking=True))
            acc.update(logits, batch["labels"], batch)  # with a store, the batch holds the teacher's target
    finally:
        model.train(was_training)
    return acc.compute()
