"""Compress a distilled student: prune, optionally distil again, quantize, export, and measure it
against its teacher (the steps, the table and the all-or-nothing ``--out``: docs/COMPRESS.md).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import statistics
import time
import warnings
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from softlabels.errors import ConfigError, ModelMismatch
from softlabels.evaluation.config import QUANTIZE, CompressConfig
from softlabels.evaluation.evaluator import eval_data
from softlabels.evaluation.evaluator import format_value as cell
from softlabels.teacher.models import MLP, count_parameters

__all__ = ["CompressConfig", "compress", "prune_unstructured", "prune_hidden_units", "quantize_int8",
           "QUANTIZE", "format_markdown"]

_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _check_packages(config: CompressConfig) -> None:
    """Refuse an option whose optional package is missing before anything is loaded or written."""
    if config.quantize and _missing("torchao"):
        raise ConfigError("--quantize needs torchao, not installed here; pip install 'softlabels[compress]'")
    if config.onnx and (missing := _missing("onnx", "onnxscript")):
        raise ConfigError(f"--onnx needs {' and '.join(missing)}, not installed here; "
                          "pip install 'softlabels[compress]', or drop --onnx")


# -- the transformations ---------------------------------------------------------------------------
def prune_unstructured(model: nn.Module, amount: float) -> dict[nn.Parameter, torch.Tensor]:
    """Zero the ``amount`` fraction of smallest-magnitude weights over every Linear/Conv (global L1, made
    permanent); return each pruned weight's keep mask, for masking gradients while fine-tuning."""
    from torch.nn.utils import prune

    params = [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(amount))
    masks = {}
    for module, name in params:
        mask = getattr(module, f"{name}_mask").bool()
        prune.remove(module, name)
        masks[getattr(module, name)] = mask
    return masks


def prune_hidden_units(model: nn.Module, amount: float) -> tuple[nn.Module, list[list[int]]]:
    """A smaller built-in MLP without ``amount`` of each hidden layer's units (lowest L1 norm of incoming weights),
    and the kept units per hidden layer: its outputs are ``model``'s with the removed units zeroed."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)] if isinstance(model, MLP) else []
    if len(linears) < 2:
        raise ConfigError("--prune-structured removes hidden units of a built-in MLP student ('mlp', 'mlp-large'), "
                          "and this student has none; use --prune")
    kept: list[list[int]] = []
    for layer in linears[:-1]:
        width = layer.out_features
        keep = max(1, width - round(amount * width))
        scores = layer.weight.detach().abs().sum(1)
        kept.append(sorted(scores.topk(keep).indices.tolist()))
    small = MLP(linears[0].in_features, tuple(len(k) for k in kept), linears[-1].out_features)
    new = [m for m in small.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        rows = None  # kept inputs of the current layer: all of them for the first
        for i, (old, fresh) in enumerate(zip(linears, new)):
            w = old.weight if rows is None else old.weight[:, rows]
            out_rows = kept[i] if i < len(kept) else list(range(old.out_features))
            fresh.weight.copy_(w[out_rows])
            fresh.bias.copy_(old.bias[out_rows])
            rows = out_rows
    return small.eval(), kept


def quantize_int8(model: nn.Module, how: str = "int8-weight") -> nn.Module:
    """Quantize every Linear's weights to int8 in place with torchao (per-channel scales); return the model."""
    # torchao logs a warning for each optional CUDA kernel library it cannot load on a CPU-only torch,
    # and registers an Enum with torch's pytree in a way torch now calls deprecated: noise on every run.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao.quantization as ao

    cfg = ao.Int8WeightOnlyConfig() if how == "int8-weight" else ao.Int8DynamicActivationInt8WeightConfig()
    ao.quantize_(model, cfg)
    return model


def _dense(p: torch.Tensor) -> torch.Tensor:
    return p if type(p) in (torch.Tensor, nn.Parameter) else p.dequantize()  # torchao int8 tensors


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(_dense(p.detach()))) for p in model.parameters())


# -- measuring -------------------------------------------------------------------------------------
def latencies_ms(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[tuple[float, float]]:
    """Median and fastest wall time of a forward pass of each model on ``x``, one CPU thread, in ms;
    the models take turns, each after an untimed pass (docs/COMPRESS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.no_grad():
            for i in range(repeats + 3):  # 3 warm-up rounds
                for model, t in zip(models, times):
                    model(x)
                    t0 = time.perf_counter()
                    model(x)
                    if i >= 3:
                        t.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return [(1000 * statistics.median(t), 1000 * min(t)) for t in times]


def _measure(name: str, model: nn.Module, file: Path, dataset, store, config: CompressConfig,
             num_classes: int) -> dict[str, Any]:
    from softlabels.student.metrics import evaluate_model

    blob = file.read_bytes()
    metrics = evaluate_model(model, dataset, num_classes=num_classes, batch_size=config.batch_size, store=store)
    return {"model": name, "file": str(file), "size_bytes": len(blob), "size_gzip_bytes": len(zlib.compress(blob, 6)),
            "parameters": count_parameters(model), "nonzero_parameters": count_nonzero(model),
            "accuracy": metrics["accuracy"], "agreement": metrics.get("agreement"),
            "kl_to_teacher": metrics.get("kl_to_teacher"), "correlation": metrics.get("correlation"),
            "teacher_accuracy": metrics.get("teacher_accuracy")}


# -- the command -----------------------------------------------------------------------------------
def _finetune(model: nn.Module, masks: dict, config: CompressConfig, spec: str, out: Path, log) -> dict[str, Any]:
    """Distil ``model`` further from the stores with softlabels.student.trainer; pruned weights get zero gradients."""
    from softlabels.student.trainer import TrainConfig, train

    # Zero gradient at a zero weight keeps it exactly 0 under SGD and AdamW (moments stay 0; decay scales 0).
    handles = [p.register_hook(lambda g, m=m: g * m) for p, m in masks.items()]
    try:
        tc = TrainConfig(student=f"{spec} (compressed)", out=str(out), stores=tuple(config.finetune_stores),
                         epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed, device="cpu",
                         progress=False)
        summary = train(tc, student=model, log=log)
    finally:
        for h in handles:
            h.remove()
    model.eval()
    return {"epochs": summary["epochs"], "steps": summary["steps"], "final_loss": summary["final"].get("loss")}


def _export(model: nn.Module, x: torch.Tensor, tmp: Path, onnx: bool) -> dict[str, str]:
    example = (x[:2],)  # two rows: a batch of 1 would be specialised to a constant
    with warnings.catch_warnings():  # torchao's tensor subclasses trip a pytree deprecation inside torch
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        torch.export.save(program, tmp / "model.pt2")
        files = {"pt2": "model.pt2"}
        if onnx:
            torch.onnx.export(program, example, str(tmp / "model.onnx"), dynamo=True, verbose=False,
                              external_data=False)
            files["onnx"] = "model.onnx"
    return files


def compress(config: CompressConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compress the student of ``config.run``; return the result (also in ``OUT/compress.json``)."""
    from softlabels.store.reader import open_store
    from softlabels.student.checkpoint import open_run

    log = log or (lambda _msg: None)
    if problems := config.problems():
        raise ConfigError(problems)
    _check_packages(config)
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise ConfigError(f"--out {str(out)!r} already exists; pass --overwrite to replace it, "
                          "or choose another directory")
    run = open_run(config.run)
    spec = run.student_spec(config.student)
    student = run.build(spec)
    small, info = copy.deepcopy(student), {}
    if config.prune_structured is not None:  # first: a student without hidden units is refused here
        small, kept = prune_hidden_units(small, config.prune_structured)
        info["hidden_units"] = [len(k) for k in kept]
    teacher_run = open_run(config.teacher) if config.teacher else None
    teacher = teacher_run.build(config.teacher_spec, flag="--teacher-spec") if teacher_run else None
    dataset = eval_data(config.data, {"input_shape": run.input_shape}, lm=False)
    with open_store(config.store) if config.store else contextlib.nullcontext() as store:
        if store is not None and store.meta.num_classes != run.num_classes:
            raise ModelMismatch(f"the student has {run.num_classes} classes but store {config.store!r} has "
                                f"{store.meta.num_classes}; pass the store of this student's teacher")
        result = _write(config, out, spec, run, student, small, info, teacher_run, teacher, dataset, store, log)
    log(f"wrote {', '.join(f'{out}/{f}' for f in result['files'].values())}, {out}/compress.json and compress.md")
    return result


def _write(config: CompressConfig, out: Path, spec: str, run, student: nn.Module, small: nn.Module,
           info: dict[str, Any], teacher_run, teacher: nn.Module | None, dataset, store, log) -> dict[str, Any]:
    """Prune, fine-tune, quantize, export and measure into a temporary directory, then rename it to ``out``."""
    from softlabels.student.checkpoint import atomic_save, staged_dir

    x = dataset.get_batch(torch.arange(min(config.batch_size, len(dataset))).numpy())[0].float()

    with staged_dir(out) as tmp:
        masks = {}
        if config.prune is not None:
            masks = prune_unstructured(small, config.prune)
            total = sum(m.numel() for m in masks.values())
            info["pruned_fraction"] = sum(int((~m).sum()) for m in masks.values()) / total
        if config.finetune_stores:
            log(f"fine-tuning the pruned student for {config.finetune_epochs} epoch(s) from "
                f"{', '.join(config.finetune_stores)}")
            info["finetune"] = _finetune(small, masks, config, spec, tmp / "finetune", log)
        if config.quantize:
            quantize_int8(small, config.quantize)
        small.eval()
        atomic_save(small.state_dict(), tmp / "model.pt")
        files = {"model": "model.pt", **_export(small, x, tmp, config.onnx)}
        measured = [("student", student, run.weights), ("compressed", small, tmp / "model.pt")]
        if teacher is not None:
            measured.insert(0, ("teacher", teacher, teacher_run.weights))
        rows = [_measure(name, model, file, dataset, store, config, run.num_classes) for name, model, file in measured]
        times = latencies_ms([m for _, m, _ in measured], x, config.repeats)
        for row, (ms, fastest) in zip(rows, times):  # the ratio: fastest passes, timed in the same rounds
            row.update(latency_ms=ms, latency_min_ms=fastest, latency_batch=len(x),
                       latency_vs_student=fastest / times[-2][1])
        rows[-1]["file"] = files["model"]  # the compressed model's, as it lies in out
        result = {"run": str(config.run), "student": spec, "settings": asdict(config), **info, "files": files,
                  "export_bytes": (tmp / "model.pt2").stat().st_size,
                  "teacher_accuracy_from_store": rows[-1]["teacher_accuracy"], "rows": rows,
                  "torch": torch.__version__}
        (tmp / "compress.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / "compress.md").write_text(format_markdown(result) + "\n")
    return result


def format_markdown(result: dict[str, Any]) -> str:
    """The rows of a compress result as a Markdown table."""
    lines = ["| model | size (KiB) | gzip (KiB) | parameters | nonzero | accuracy | agreement | KL to teacher "
             f"| CORR | CPU ms / batch of {result['rows'][0]['latency_batch']}, median (fastest) | fastest vs RUN |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['size_bytes'] / 1024:.1f} | {r['size_gzip_bytes'] / 1024:.1f} "
                     f"| {r['parameters']:,} | {r['nonzero_parameters']:,} "
                     f"| {cell(r['accuracy'], 'pct')} | {cell(r['agreement'], 'pct')} "
                     f"| {cell(r['kl_to_teacher'], 'f4')} | {cell(r['correlation'], 'f4')} "
                     f"| {r['latency_ms']:.3f} ({r['latency_min_ms']:.3f}) | {r['latency_vs_student']:.2f}x |")
    return "\n".join(lines)
