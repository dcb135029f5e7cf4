"""``softlabels eval`` for language-model runs: perplexity, calibration and agreement with the teacher.

On held-out token data alone: next-token loss, perplexity, top-1 accuracy and ECE
(:class:`~softlabels.student.lm_metrics.LMEvalAccumulator`). With the teacher's ``tokens`` store of
exactly that data, also top-1 agreement with the teacher and the KL from teacher to student
at T = 1 (``kl_to_teacher``, its kind in ``kl_to_teacher_kind``): exact for dense stores;
for top-k and sampled stores over the stored ids plus one tail bucket, a lower bound of the
full KL that is never negative (the log-sum inequality) and means the same for both sparse
layouts. A sampled store also gets ``kl_to_teacher_estimate``, the layout's unbiased
estimate: right on average, but one token's estimate can be negative, and so can a mean
over few tokens of a student close to its teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from softlabels.errors import ModelMismatch, SpecError
from softlabels.evaluation.config import EvalConfig
from softlabels.store.layouts.targets import SampledTarget
from softlabels.student import kd
from softlabels.student.dataset import SoftLabelDataset
from softlabels.student.kinds.tokens import select_rows
from softlabels.student.lm_metrics import LMEvalAccumulator
from softlabels.student.losses import as_target

__all__ = ["evaluate_lm", "is_lm_run"]


def is_lm_run(config: dict[str, Any]) -> bool:
    return config.get("task") == "lm"


def _student(ckpt_path: Path, config: dict[str, Any], student: str | None, device: torch.device):
    from softlabels.student.checkpoint import MODEL
    from softlabels.teacher.lm import BUILTIN_LMS, resolve_lm

    spec = student or config.get("student")
    if student is None and spec not in BUILTIN_LMS:  # code is never taken from a checkpoint
        raise SpecError(f"checkpoint {str(ckpt_path)!r} was trained with student {spec!r}, which is not a built-in "
                        "language model; pass --student with its spec")
    weights = ckpt_path.parent / MODEL
    info = resolve_lm(spec, vocab_size=int(config["num_classes"]), context=int(config["input_shape"][0]),
                      weights=weights if weights.is_file() else None)
    if not weights.is_file():
        info.module.model.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"])
    return info.module.to(device).eval()


def evaluate_lm(checkpoint: str | Path, data_spec: str, store: str | Path | None = None, *,
                batch_size: int = EvalConfig.batch_size, device: str = EvalConfig.device,
                threads: int = EvalConfig.threads, student: str | None = None) -> dict[str, Any]:
    """Metrics of an LM run's student on ``data_spec`` (and against ``store``'s teacher); a flat dict."""
    from softlabels._runtime.device import resolve_device, set_threads
    from softlabels.inputs.text import resolve_token_data
    from softlabels.store.ensemble.reader import open_units
    from softlabels.student.checkpoint import find_checkpoint, load_checkpoint

    set_threads(threads)
    dev = resolve_device(device)
    ckpt_path = find_checkpoint(checkpoint)
    config = load_checkpoint(ckpt_path)["config"]
    model = _student(ckpt_path, config, student, dev)
    seq_len = (config.get("seq_len") or int(config["input_shape"][0])) if data_spec.startswith("text:") else None
    data = resolve_token_data(data_spec, tokenizer=config.get("tokenizer"), seq_len=seq_len)
    acc = LMEvalAccumulator()
    teacher = {"n": 0, "agree": 0.0, "kl": 0.0, "estimate": 0.0}
    if store is None:
        for lo in range(0, len(data), batch_size):
            b = data.get_batch(np.arange(lo, min(lo + batch_size, len(data))))
            with torch.no_grad():
                acc.update(model(b.ids.to(dev)), b.ids.to(dev), b.mask.to(dev), b.lengths.to(dev))
    else:
        opened = open_units(store)
        try:
            if opened.meta.num_classes != int(config["num_classes"]):
                raise ModelMismatch(f"the student has a vocabulary of {config['num_classes']} but store "
                                    f"{str(store)!r} has {opened.meta.num_classes}; pass the store of this "
                                    "student's teacher (cross-tokenizer distillation is not supported)")
            ds = SoftLabelDataset([(opened, data)], batch_size=batch_size, shuffle=False, rank=0, world_size=1)
            for batch in ds:
                batch = {k: v.to(dev) for k, v in batch.items()}
                with torch.no_grad():
                    logits = model(batch["ids"])
                    acc.update(logits, batch["ids"], lengths=batch["lengths"],
                               mask=batch["loss_mask"].roll(1, 1))  # token t+1 is a target
                    _teacher_terms(teacher, logits, batch)
        finally:
            opened.close()
    out: dict[str, Any] = {"student": config.get("student"), "data": data_spec, "store": str(store) if store else None,
                           "sequences": len(data), **acc.compute()}
    if teacher["n"]:
        out.update(agreement=teacher["agree"] / teacher["n"], kl_to_teacher=teacher["kl"] / teacher["n"],
                   kl_to_teacher_kind="exact" if ds.layout == "dense" else "lower bound (stored ids + tail)",
                   teacher_layout=ds.layout)
        if ds.layout == "sampled":
            out["kl_to_teacher_estimate"] = teacher["estimate"] / teacher["n"]
    return out


def _teacher_terms(sums: dict[str, float], logits: torch.Tensor, batch: dict[str, Any]) -> None:
    """Add the batch's agreement and KL(teacher || student) over its counted positions."""
    index = batch["index"]
    keep = batch["loss_mask"].reshape(-1)[index]
    s = logits.reshape(-1, logits.shape[-1])[index[keep]].float()
    target = select_rows(as_target(batch), keep)
    sums["kl"] += float(kd.divergence("forward_kl", s, target, 1.0).double().sum())
    if isinstance(target, SampledTarget):
        sums["estimate"] += float(kd.sampled_kl(s, target, 1.0).double().sum())
    sums["n"] += int(keep.sum())
    sums["agree"] += float((s.argmax(-1) == target.top1()).sum())
