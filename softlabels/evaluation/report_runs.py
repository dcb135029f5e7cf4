"""The models of a run directory for a report, and where their numbers come from (docs/USAGE.md,
Reports).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softlabels._runtime.options import is_number
from softlabels.errors import RunNotFound, SoftLabelsError
from softlabels.student.checkpoint import CHECKPOINT, METRICS, SUMMARY, read_metrics

__all__ = ["RESULTS", "ModelRun", "compute_reliability", "find_models"]

RESULTS = "results.json"
EVAL = "eval.json"


@dataclass
class ModelRun:
    """One model of a run: its training log, and its test metrics when known."""

    name: str
    dir: Path | None
    role: str = "student"  # "teacher" or "student"
    arch: str | None = None
    description: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # test metrics (accuracy, agreement, ...)
    reliability: dict[str, list] | None = None
    note: str = ""  # why something is missing

    @property
    def accuracy(self) -> float | None:
        return _num(self.result.get("accuracy"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _num(x: Any) -> float | None:
    return float(x) if is_number(x) else None


def _load_run(name: str, d: Path | None) -> ModelRun:
    m = ModelRun(name=name, dir=d)
    if d is None or not d.is_dir():
        return m
    m.metrics = read_metrics(d)
    m.summary = _read_json(d / SUMMARY) or {}
    m.arch = m.summary.get("student") or (m.summary.get("config") or {}).get("student")
    m.result = _read_json(d / EVAL) or {}
    return m


def find_models(run_dir: str | Path) -> tuple[list[ModelRun], dict[str, Any]]:
    """The models of ``run_dir`` (teacher first) and its ``results.json`` (empty if absent)."""
    root = Path(run_dir)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise RunNotFound(f"run directory {str(run_dir)!r} {what}; pass a 'softlabels train --out' directory "
                          "or a tools/demo.py --out directory")
    results = _read_json(root / RESULTS) or {}
    models: list[ModelRun] = []
    if isinstance(results.get("models"), list):
        for entry in results["models"]:
            if not isinstance(entry, dict) or "name" not in entry:
                continue
            d = root / entry["dir"] if entry.get("dir") else None
            m = _load_run(str(entry["name"]), d)
            m.role = entry.get("role") or m.role
            m.arch = entry.get("arch") or m.arch
            m.description = entry.get("description") or ""
            ev = entry.get("eval") if isinstance(entry.get("eval"), dict) else {}
            m.result = {**m.result, **ev, **{k: v for k, v in entry.items() if k not in ("eval", "dir")}}
            models.append(m)
    elif (root / METRICS).is_file():
        models.append(_load_run(root.resolve().name, root))
    else:
        # A directory of runs: every sub-directory (one or two levels down) with a metrics log.
        dirs = sorted({p.parent for p in [*root.glob(f"*/{METRICS}"), *root.glob(f"*/*/{METRICS}")]})
        models = [_load_run(d.relative_to(root).as_posix(), d) for d in dirs]
    if not models:
        raise RunNotFound(f"no training run in {str(run_dir)!r} (no {METRICS} in it or its sub-directories, "
                          f"no {RESULTS}); pass a 'softlabels train --out' directory")
    teacher = results.get("teacher")
    for m in models:
        if m.name == teacher or (teacher is None and m.name == "teacher"):
            m.role = "teacher"
        if m.result.get("reliability"):
            m.reliability = m.result["reliability"]
    models.sort(key=lambda m: m.role != "teacher")  # stable: the teacher first, the rest in order
    return models, results


def compute_reliability(model: ModelRun, *, n_bins: int = 15) -> None:
    """Fill ``model.reliability`` from its checkpoint and its eval's data spec, when both are known."""
    if model.reliability is not None:
        return
    data = model.result.get("data")
    if model.dir is None or not (model.dir / CHECKPOINT).is_file() or not data:
        model.note = "no reliability bins: no eval JSON with them, and no checkpoint + eval data spec to compute them"
        return
    from softlabels.evaluation.evaluator import load_student
    from softlabels.inputs.spec import resolve_data
    from softlabels.student.metrics import EvalAccumulator, evaluate_model
    from softlabels.teacher.spec import recorded_spec

    try:  # the eval's data spec and the checkpoint's student spec are data: built-ins and files only
        spec = recorded_spec(data, kind="data", where=f"the eval results of {model.name!r}",
                             flag=f"softlabels eval --checkpoint {model.dir} --json --data")
        net, config = load_student(model.dir)
        dataset = resolve_data(spec)
        acc = EvalAccumulator(int(config["num_classes"]), n_bins=n_bins)
        evaluate_model(net, dataset, num_classes=acc.num_classes, batch_size=1024, acc=acc)
    except SoftLabelsError as err:
        model.note = f"no reliability bins ({err})"
        return
    model.reliability = acc.reliability()
    model.result.setdefault("ece", acc.compute()["ece"])
