"""Evaluate a trained student: accuracy and calibration on ``--data``, and with the store of its
teacher's outputs for that data their agreement and divergence (language models: docs/TOKENS.md).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softlabels._runtime.options import bound_problems
from softlabels.errors import ConfigError, ModelMismatch, SpecError
from softlabels.evaluation.config import EvalConfig
from softlabels.student.checkpoint import CHECKPOINT, HF_DIR, MODEL, find_checkpoint, load_checkpoint
from softlabels.teacher.models import count_flops, count_parameters

__all__ = ["evaluate", "finite_json", "load_student", "format_table", "format_value"]


def load_student(checkpoint: str | Path, *, device: str | torch.device = "cpu",
                 student: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained classifier (eval mode) and the run's config, from a run directory or checkpoint file;
    ``student``: the architecture spec, by default the recorded one (data: a built-in name only)."""
    from softlabels.teacher.spec import recorded_spec, resolve_model

    ckpt_path = find_checkpoint(checkpoint)
    state = load_checkpoint(ckpt_path)
    config = {**state["config"], "epochs_done": state["epoch"]}
    if student is None:
        student = recorded_spec(config.get("student"), kind="model", where=f"checkpoint {str(ckpt_path)!r}",
                                flag="--student")
    config["student"] = student
    weights = ckpt_path.parent / MODEL if Path(checkpoint).is_dir() and (ckpt_path.parent / MODEL).is_file() \
        else ckpt_path  # resolve_model reads a checkpoint's "model" entry as a state_dict too
    info = resolve_model(student, input_shape=tuple(config["input_shape"]),
                         num_classes=int(config["num_classes"]), weights=weights)
    config = {**config, "weights": str(weights), "weights_sha256": info.weights_sha256}
    return info.module.to(device).eval(), config


def _hf_directory(checkpoint: str | Path) -> Path | None:
    """``checkpoint`` when it is a Hugging Face model directory (a run's ``hf/``, say) rather than a run."""
    path = Path(checkpoint)
    return path if path.is_dir() and (path / "config.json").is_file() and not (path / CHECKPOINT).exists() else None


def _load_lm(checkpoint: str | Path, *, device: torch.device, student: str | None) -> tuple[nn.Module, dict]:
    """The trained language model (eval mode) and the run's config: an ``hf:`` student's from its
    run's ``hf/``; a Hugging Face directory with its run's config, else its own tokenizer and
    context."""
    from softlabels.teacher.hf import max_positions
    from softlabels.teacher.lm import BUILTIN_LMS, resolve_lm

    hf = _hf_directory(checkpoint)
    run = hf.parent if hf is not None and (hf.parent / CHECKPOINT).is_file() else None if hf else Path(checkpoint)
    config: dict[str, Any] = {"task": "lm", "epochs_done": None}
    if run is not None:
        ckpt_path = find_checkpoint(run)
        state = load_checkpoint(ckpt_path)
        config = {**state["config"], "epochs_done": state["epoch"]}
        own = ckpt_path.parent / HF_DIR
        if hf is None and student is None and str(config.get("student", "")).startswith("hf:") and own.is_dir():
            hf = own  # the run's own export: data (JSON and safetensors), no code
    spec = f"hf:{hf}" if hf is not None else student or config.get("student")
    if hf is None and student is None and spec not in BUILTIN_LMS:
        raise SpecError(f"checkpoint {str(ckpt_path)!r} was trained with student {spec!r}, which is not a built-in "
                        "language model; pass --student with its spec")
    weights = None if hf is not None else ckpt_path.parent / MODEL
    context = int(config["input_shape"][0]) if "input_shape" in config else None
    info = resolve_lm(spec, vocab_size=config.get("num_classes"), context=context,
                      weights=weights if weights is not None and weights.is_file() else None)
    if weights is not None and not weights.is_file():
        info.module.model.load_state_dict(state["model"])
    if run is None:  # a bare Hugging Face directory: its own tokenizer and context
        tokenizer = hf / "tokenizer.json"
        config.update(tokenizer=str(tokenizer) if tokenizer.is_file() else None, num_classes=info.vocab_size,
                      input_shape=[max_positions(info.module.model) or 1024])
    return info.module.to(device).eval(), {**config, "student": spec, "weights_sha256": info.weights_sha256}


def evaluate(checkpoint: str | Path, data_spec: str, store: str | Path | None = None, *,
             batch_size: int = EvalConfig.batch_size, device: str = EvalConfig.device,
             threads: int = EvalConfig.threads, student: str | None = None) -> dict[str, Any]:
    """Evaluate the student of a training run on ``data_spec`` (and against ``store``'s teacher): a
    flat dict of :class:`~softlabels.student.metrics.EvalAccumulator`'s metrics, or a language
    model's (docs/TOKENS.md), with the student, ``num_parameters`` and what was evaluated."""
    from softlabels._runtime.device import resolve_device, set_threads
    from softlabels.inputs.spec import absolute_data_spec
    from softlabels.store.reader import open_store

    if problems := bound_problems("an integer >=", 0, {"threads": threads}) + \
            bound_problems("an integer >=", 1, {"batch_size": batch_size}):
        raise ConfigError(problems)
    set_threads(threads)
    dev = resolve_device(device)  # an unknown or absent device is a one-line error
    lm = _hf_directory(checkpoint) is not None or \
        load_checkpoint(find_checkpoint(checkpoint))["config"].get("task") == "lm"
    model, config = _load_lm(checkpoint, device=dev, student=student) if lm else \
        load_student(checkpoint, device=dev, student=student)
    data, num_classes = eval_data(data_spec, config, lm), int(config["num_classes"])
    with contextlib.nullcontext() if store is None else open_store(store) as opened:
        if opened is not None:  # the teacher metrics compare at T = 1
            from softlabels.store.ensemble import check_temperature

            check_temperature(opened.meta, 1.0, str(store), command="eval")
            if opened.meta.num_classes != num_classes:
                raise ModelMismatch(
                    f"the student has a vocabulary of {num_classes} but store {str(store)!r} has "
                    f"{opened.meta.num_classes}; pass the store of this student's teacher (cross-tokenizer "
                    "distillation is not supported)" if lm else f"the student has {num_classes} classes but store "
                    f"{str(store)!r} has {opened.meta.num_classes}; pass the store of this student's teacher")
        if lm:
            if opened is not None:  # the same size is not the same vocabulary
                from softlabels.inputs.vocabulary import check_same_tokenizer

                check_same_tokenizer(opened.meta.source.get("tokenizer_fingerprint"), config.get("tokenizer"),
                                     what="the student's tokenizer", store=str(store))
            metrics = _lm_metrics(model, data, opened, batch_size, dev)
        else:
            from softlabels.student.metrics import evaluate_model

            metrics = evaluate_model(model, data, num_classes=num_classes, batch_size=batch_size, device=dev,
                                     store=opened)
            metrics["flops"] = count_flops(model, tuple(config["input_shape"]))
    return finite_json({
        "checkpoint": str(checkpoint), "data": absolute_data_spec(data_spec), "store": None if store is None else str(store),
        "student": config["student"], "weights_sha256": config["weights_sha256"],
        "num_parameters": count_parameters(model), "epochs_trained": config.get("epochs_done"), **metrics,
    })


def eval_data(spec: str, config: dict[str, Any], lm: bool) -> Any:
    """The data to evaluate on, checked against what the student was trained on."""
    if lm:
        from softlabels.inputs.text import needs_seq_len, resolve_token_data

        # the run's windows: its --seq-len (text, a stream, re-windowed rows, documents), or its context
        seq_len = config.get("seq_len") or (int(config["input_shape"][0]) if needs_seq_len(spec) else None)
        return resolve_token_data(spec, tokenizer=config.get("tokenizer"), seq_len=seq_len)
    from softlabels.inputs.spec import resolve_data

    dataset, input_shape = resolve_data(spec), tuple(config["input_shape"])
    if tuple(dataset.input_shape) != input_shape:
        raise ModelMismatch(f"the student was trained on inputs of shape {input_shape} but {spec!r} has "
                            f"{tuple(dataset.input_shape)}; evaluate on data of the kind it was trained on")
    return dataset


@torch.no_grad()
def _lm_metrics(model: nn.Module, data: Any, store: Any, batch_size: int, dev: torch.device) -> dict[str, Any]:
    """Next-token metrics of ``model`` on ``data``, against ``store``'s teacher if given (see the module doc)."""
    from softlabels.store.layouts.targets import SampledTarget
    from softlabels.student import kd
    from softlabels.student.dataset import SoftLabelDataset
    from softlabels.student.lm_metrics import LMEvalAccumulator
    from softlabels.student.losses import as_target

    acc, sums = LMEvalAccumulator(), {"n": 0, "agree": 0.0, "kl": 0.0, "estimate": 0.0}
    kl_t: float | None = 1.0
    if store is None:
        for lo in range(0, len(data), batch_size):
            b = data.get_batch(np.arange(lo, min(lo + batch_size, len(data))))
            acc.update(model(b.ids.to(dev)), b.ids.to(dev), b.mask.to(dev), b.lengths.to(dev))
        return {"sequences": len(data), **acc.compute()}
    layout = store.meta.layout
    for batch in SoftLabelDataset([(store, data)], batch_size=batch_size, shuffle=False, rank=0, world_size=1):
        batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(batch["ids"])
        acc.update(logits, batch["ids"], lengths=batch["lengths"], mask=batch["loss_mask"].roll(1, 1))  # t+1: a target
        keep = batch["loss_mask"].reshape(-1)[batch["index"]]  # the counted positions, against the teacher
        s = logits.reshape(-1, logits.shape[-1])[batch["index"][keep]].float()
        target = as_target(batch).select(keep)
        kl, kl_t = kd.reported_kl(s, target)  # at T = 1 where the store answers it, else at its own T
        sums["kl"] += float(kl.double().sum()) if kl is not None else math.nan
        if isinstance(target, SampledTarget):
            sums["estimate"] += float(kd.sampled_kl(s, target, target.temperature).double().sum())
        sums["n"] += int(keep.sum())
        sums["agree"] += float((s.argmax(-1) == target.top1()).sum())
    out: dict[str, Any] = {"sequences": len(data), **acc.compute()}
    if sums["n"]:
        ids_only = layout == "sampled" and kl_t is None
        out.update(agreement=sums["agree"] / sums["n"], kl_to_teacher=None if ids_only else sums["kl"] / sums["n"],
                   kl_to_teacher_kind="exact" if layout == "dense" else
                   "not available (an ids-only sampled store holds no teacher logits)" if ids_only else
                   "lower bound (stored ids + tail)", teacher_layout=layout)
        if kl_t not in (1.0, None):
            out["kl_to_teacher_temperature"] = kl_t
        if layout == "sampled":  # ids only: the soft cross-entropy estimate (the KL plus the teacher's entropy)
            out["soft_ce_estimate" if ids_only else "kl_to_teacher_estimate"] = sums["estimate"] / sums["n"]
    return out


def finite_json(result: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf metrics become None and are named in ``warnings``: JSON has no NaN, and a reader must see why."""
    warnings = list(result.get("warnings", []))
    out = dict(result)
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            warnings.append(f"{key} is {value} (non-finite); reported as null")
    if result.get("nonfinite_rows"):
        warnings.append(f"{result['nonfinite_rows']} of {result.get('n')} rows of student logits are NaN/inf; "
                        "they count as wrong and are left out of the ECE")
    out["warnings"] = warnings
    return out


_ROWS = (
    ("loss", "next-token loss", "f4"), ("perplexity", "perplexity", "f4"), ("positions", "positions", "int"),
    ("accuracy", "accuracy", "pct"), ("ece", "ECE", "f4"),
    ("teacher_accuracy", "teacher accuracy", "pct"), ("agreement", "top-1 agreement", "pct"),
    ("kl_to_teacher", "KL to teacher", "f4"), ("kl_to_teacher_kind", "KL to teacher is", "str"),
    ("kl_to_teacher_estimate", "KL to teacher, sampled estimate", "f4"),
    ("kl_to_teacher_temperature", "KL to teacher at T", "f4"),
    ("soft_ce_estimate", "soft CE to teacher, estimate", "f4"), ("correlation", "logit correlation (CORR)", "f4"),
    ("teacher_ece", "teacher ECE", "f4"), ("n", "samples", "int"), ("n_labeled", "labeled", "int"),
    ("num_parameters", "parameters", "int"), ("flops", "MACs / sample", "int"),
    ("nonfinite_rows", "NaN/inf rows", "int"),
)


def format_value(value: Any, how: str) -> str:
    """A metric as a table cell: ``how`` is pct, int, str or f4; ``-`` for a missing one or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if how == "pct":
        return f"{100 * value:.2f} %"
    if how == "str":
        return str(value)
    return f"{value:,}" if how == "int" else f"{value:.4f}"


def format_table(result: dict[str, Any]) -> str:
    """The result as an aligned two-column text table (metrics absent from it are skipped)."""
    rows = [(label, format_value(result[key], how)) for key, label, how in _ROWS
            if key in result and (key != "nonfinite_rows" or result[key])]
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    return "\n".join(f"{label:<{width}}  {value:>{vwidth}}" for label, value in rows)
