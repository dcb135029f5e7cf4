"""Evaluate a trained student: accuracy and calibration, and agreement with its teacher.

:func:`evaluate` loads a ``softlabels train`` run (its checkpoint's config names
the student spec, input shape and class count), runs it over a ``--data`` spec and,
given the store of teacher logits for exactly that data, compares it with the
teacher row by row (rows joined by ``sample_ids``; the store's fingerprint of its
inputs must match the data). :func:`evaluate_model` is the loop, shared with the
trainer's per-epoch validation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softlabels._runtime.options import threads_problem
from softlabels.errors import ConfigError, ModelMismatch
from softlabels.evaluation.config import EvalConfig
from softlabels.student.checkpoint import MODEL, find_checkpoint, load_checkpoint
from softlabels.student.metrics import evaluate_model
from softlabels.teacher.models import count_flops, count_parameters

__all__ = ["evaluate", "finite_json", "load_student", "format_table"]

def load_student(checkpoint: str | Path, *, device: str | torch.device = "cpu",
                 student: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained student (eval mode) and the run's config, from a run directory or checkpoint file.

    ``student`` is the architecture spec; by default the checkpoint's recorded one, which
    is data and so must be a built-in name (:func:`~softlabels.teacher.spec.recorded_spec`).
    """
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


def evaluate(checkpoint: str | Path, data_spec: str, store: str | Path | None = None, *,
             batch_size: int = EvalConfig.batch_size, device: str = EvalConfig.device,
             threads: int = EvalConfig.threads, student: str | None = None) -> dict[str, Any]:
    """Evaluate the student of a training run on ``data_spec`` (and against ``store``'s teacher).

    ``student`` overrides the checkpoint's recorded architecture spec (see :func:`load_student`).

    Returns a flat dict: ``accuracy``, ``ece``, ``n``, ``n_labeled``; with a store also
    ``teacher_accuracy``, ``agreement``, ``kl_to_teacher``, ``correlation`` and (dense
    stores) ``teacher_ece``; plus ``num_parameters`` and ``flops`` (multiply-accumulates
    per sample) of the student and what was evaluated. ``threads`` sets torch's CPU
    threads (0: torch's default); defaults as in :class:`softlabels.evaluation.config.EvalConfig`.
    """
    from softlabels._runtime.device import resolve_device, set_threads
    from softlabels.inputs.spec import resolve_data
    from softlabels.store.reader import open_store

    if problems := threads_problem(threads):
        raise ConfigError(problems)
    from softlabels.evaluation.lm_eval import evaluate_lm, is_lm_run

    if is_lm_run(load_checkpoint(find_checkpoint(checkpoint))["config"]):  # a language model: per-token metrics
        return evaluate_lm(checkpoint, data_spec, store, batch_size=batch_size, device=device, threads=threads,
                           student=student)
    set_threads(threads)
    device = resolve_device(device)  # an unknown or absent device is a one-line error
    model, config = load_student(checkpoint, device=device, student=student)
    dataset = resolve_data(data_spec)
    input_shape, num_classes = tuple(config["input_shape"]), int(config["num_classes"])
    if tuple(dataset.input_shape) != input_shape:
        raise ModelMismatch(
            f"the student was trained on inputs of shape {input_shape} but {data_spec!r} has {tuple(dataset.input_shape)}; "
            "evaluate on data of the kind it was trained on"
        )
    opened = None
    if store is not None:
        opened = open_store(store)
        if opened.meta.num_classes != num_classes:
            raise ModelMismatch(f"the student has {num_classes} classes but store {str(store)!r} has "
                                f"{opened.meta.num_classes}; pass the store of this student's teacher")
    try:
        metrics = evaluate_model(model, dataset, num_classes=num_classes, batch_size=batch_size, device=device,
                                 store=opened)
    finally:
        if opened is not None:
            opened.close()
    return finite_json({
        "checkpoint": str(checkpoint), "data": data_spec, "store": None if store is None else str(store),
        "student": config["student"], "weights_sha256": config["weights_sha256"],
        "num_parameters": count_parameters(model), "flops": count_flops(model, input_shape),
        "epochs_trained": config.get("epochs_done"), **metrics,
    })


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
    ("kl_to_teacher_estimate", "KL to teacher, sampled estimate", "f4"), ("correlation", "logit correlation (CORR)", "f4"),
    ("teacher_ece", "teacher ECE", "f4"), ("n", "samples", "int"), ("n_labeled", "labeled", "int"),
    ("num_parameters", "parameters", "int"), ("flops", "MACs / sample", "int"),
    ("nonfinite_rows", "NaN/inf rows", "int"),
)


def format_table(result: dict[str, Any]) -> str:
    """The result as an aligned two-column text table (metrics absent from it are skipped)."""
    def fmt(value: Any, how: str) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if how == "pct":
            return f"{100 * value:.2f} %"
        if how == "str":
            return str(value)
        return f"{value:,}" if how == "int" else f"{value:.4f}"

    rows = [(label, fmt(result[key], how)) for key, label, how in _ROWS
            if key in result and (key != "nonfinite_rows" or result[key])]
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    return "\n".join(f"{label:<{width}}  {value:>{vwidth}}" for label, value in rows)
