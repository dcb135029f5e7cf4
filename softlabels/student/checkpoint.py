"""A training run's directory, every file replaced atomically (temp file, fsync, ``os.replace``)::

    checkpoint.pt   {"format": 1, "model", "optimizer", "scheduler", "epoch" (completed), "step", "rng",
                     "config"}: plain tensors and containers, loadable with torch.load(weights_only=True)
    model.pt        the student's plain state_dict (``--weights`` for generate/eval)
    metrics.jsonl   one JSON object per completed epoch
    summary.json    written once, after the last epoch
    hf/             a Hugging Face student only: save_pretrained and its tokenizer files, rewritten with
                    model.pt; AutoModelForCausalLM.from_pretrained loads it

A killed run leaves at worst a stale temp file; the files it names are always whole. A finished run is
also an input (:func:`open_run`: ``softlabels compress RUN``, ``softlabels train --init RUN``); what it
records is data, so only a built-in model name is rebuilt from it (anything else needs the spec on the
command line).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softlabels.errors import CheckpointError, CheckpointNotFound, ConfigError

__all__ = [
    "CHECKPOINT", "MODEL", "METRICS", "SUMMARY", "CHECKPOINT_FORMAT",
    "HF_DIR", "atomic_save", "save_hf", "save_run", "staged_dir",
    "atomic_write_text", "check_out_dir", "start_out_dir", "load_checkpoint", "find_checkpoint",
    "rng_state", "set_rng_state", "append_metrics", "read_metrics", "truncate_metrics", "Run", "open_run",
    "run_weights",
]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RUN_FILES = (CHECKPOINT, MODEL, METRICS, SUMMARY)
CHECKPOINT_FORMAT = 1
HF_DIR = "hf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""A tokenizer directory's files that ``RUN/hf`` copies (what a fast tokenizer's ``save_pretrained`` writes)."""


def _atomic(path: str | Path, write: Any) -> None:
    """``write(tmp)`` to a temp file beside ``path``, fsync, then rename over it (readers see old or new)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic(path, lambda tmp: tmp.write_text(text))


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh directory beside ``final`` to fill, renamed to ``final`` when the block ends without an error
    (removed either way); an old ``final`` is removed only once the new one is in place (a reader finds the
    old one or the new one; at worst, after a kill between the two renames, none)."""
    tmp, old = (final.with_name(f".{final.name}.{what}-{os.getpid()}") for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_run(out: str | Path, model: Any, optimizer: Any, scheduler: Any, *, epoch: int, step: int,
             config: dict[str, Any]) -> None:
    """Write a run's ``model.pt`` (weights only) and ``checkpoint.pt`` (everything ``--resume`` needs)."""
    out = Path(out)
    atomic_save(model.state_dict(), out / MODEL)
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "rng": rng_state(),
                 "config": config}, out / CHECKPOINT)


def save_hf(model: Any, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write ``out/hf``: ``model.save_pretrained`` (safetensors) plus the tokenizer files beside ``tokenizer``
    (a ``tokenizer.json`` or a directory; its ``tokenizer_config.json`` carries the chat template), in a temp
    directory renamed over the previous ``hf/`` (:func:`staged_dir`)."""
    final = Path(out) / HF_DIR
    with staged_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            source = Path(tokenizer)
            folder = source if source.is_dir() else source.parent
            for name in TOKENIZER_FILES:
                src = source if name == TOKENIZER_FILES[0] and source.is_file() else folder / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
    return final


def check_out_dir(out: str | Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Check ``out`` for a previous run (read-only): its checkpoint when resuming, else None; a directory holding
    run files is refused unless ``resume`` or ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; pass a directory")
    if resume:
        ckpt = out / CHECKPOINT
        return ckpt if ckpt.exists() else None
    found = [name for name in (*RUN_FILES, HF_DIR) if (out / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"--out {str(out)!r} already holds a training run ({', '.join(found)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another directory"
        )
    return None


def start_out_dir(out: str | Path, *, keep: bool) -> None:
    """Create ``out``; unless ``keep`` (resuming), delete an earlier run's files. Rank 0, after setup succeeded."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not keep:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / HF_DIR, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file for ``path``: a run directory or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise CheckpointNotFound(
            f"no training checkpoint at {str(path)!r}; pass a 'softlabels train --out' directory or its {CHECKPOINT}"
        )
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    p = find_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickle with objects, not a torch file ...
        raise CheckpointError(f"cannot read checkpoint {str(p)!r} ({type(err).__name__}); "
                              "it is damaged or not a softlabels checkpoint") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        hint = f"; {MODEL} holds weights only, pass the run directory or its {CHECKPOINT}" \
            if p.name == MODEL else ""
        raise CheckpointError(f"{str(p)!r} is not a softlabels training checkpoint{hint}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(p)!r} has format {ckpt.get('format')!r}; "
                              f"this softlabels reads format {CHECKPOINT_FORMAT}")
    for name, check in _FIELDS.items():
        problem = check(ckpt.get(name)) if name in ckpt else "is missing"
        if problem:
            raise CheckpointError(f"checkpoint {str(p)!r} is damaged: field {name!r} {problem}; start over with "
                                  "--overwrite (or evaluate a run whose checkpoint is intact)")
    return ckpt


# -- field checks: a checkpoint is data; each returns what is wrong, or None --------------------
def _count(x: Any) -> str | None:
    ok = isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62
    return None if ok else f"must be an integer >= 0, got {_short(x)}"


def _model(x: Any) -> str | None:
    if not isinstance(x, dict) or not x:
        return f"must be a non-empty state_dict, got {_short(x)}"
    bad = [k for k, v in x.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    return f"holds non-tensor entries ({', '.join(map(repr, bad[:3]))})" if bad else None


def _optimizer(x: Any) -> str | None:
    ok = isinstance(x, dict) and isinstance(x.get("state"), dict) and isinstance(x.get("param_groups"), list) \
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in x["param_groups"])
    return None if ok else "must be an optimizer state_dict (state, param_groups with params)"


def _scheduler(x: Any) -> str | None:
    ok = isinstance(x, dict) and isinstance(x.get("last_epoch"), int) and isinstance(x.get("base_lrs"), list)
    return None if ok else "must be a scheduler state_dict (base_lrs, last_epoch)"


def _rng(x: Any) -> str | None:
    try:
        ok = (isinstance(x, dict) and isinstance(x["torch"], torch.Tensor) and x["torch"].dtype == torch.uint8
              and len(x["numpy"]) == 5 and isinstance(x["numpy"][0], str) and len(x["numpy"][1]) == 624
              and len(x["python"]) == 3 and len(x["python"][1]) == 625
              and all(isinstance(v, int) for v in x["python"][1]))
    except (KeyError, TypeError, IndexError):
        ok = False
    return None if ok else "must hold the torch, numpy and python generator states written by softlabels"


def _config(x: Any) -> str | None:
    if not isinstance(x, dict):
        return f"must be a dict of the run's options, got {_short(x)}"
    shape, classes = x.get("input_shape"), x.get("num_classes")
    if not isinstance(shape, list) or not shape or not all(_count(d) is None and d > 0 for d in shape):
        return f"has input_shape {_short(shape)}, not a list of positive integers"
    if _count(classes) or classes < 1:
        return f"has num_classes {_short(classes)}, not a positive integer"
    return None


def _short(x: Any) -> str:
    text = repr(x) if not isinstance(x, torch.Tensor) else f"a tensor of shape {tuple(x.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


_FIELDS = {"epoch": _count, "step": _count, "model": _model, "optimizer": _optimizer, "scheduler": _scheduler,
           "rng": _rng, "config": _config}


# -- RNG state, as plain containers so the checkpoint loads with weights_only=True ----------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# -- metrics.jsonl -------------------------------------------------------------------------
def append_metrics(out: str | Path, record: dict[str, Any]) -> None:
    with open(Path(out) / METRICS, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # a line torn by a crash mid-write: that epoch reruns
            continue
        if isinstance(record, dict):  # anything else is not a line softlabels wrote
            records.append(record)
    return records


def truncate_metrics(out: str | Path, epochs_done: int) -> None:
    """Keep only epochs <= ``epochs_done`` (a crash may have logged an epoch it never checkpointed)."""
    path = Path(out) / METRICS
    if path.exists():
        keep = [r for r in read_metrics(out) if r.get("epoch", 0) <= epochs_done]
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


# -- a finished run as an input ---------------------------------------------------------------
def run_weights(run: str | Path) -> Path:
    """The ``model.pt`` of a training run directory (RunNotFound if there is none)."""
    from softlabels.errors import RunNotFound

    path = Path(run)
    if not path.is_dir():
        raise RunNotFound(f"run {str(run)!r} does not exist or is no directory; "
                          "pass a 'softlabels train --out' directory")
    weights = path / MODEL
    if not weights.is_file():
        raise RunNotFound(f"run {str(run)!r} holds no {MODEL}; pass a 'softlabels train --out' directory "
                          "with at least one finished epoch")
    return weights


@dataclass(frozen=True)
class Run:
    """A training run opened for reuse: where its weights are and what it recorded."""

    path: Path
    weights: Path
    config: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.config["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def student_spec(self, override: str | None = None, *, flag: str = "--student") -> str:
        """The spec to rebuild the student from: ``override``, else the recorded name if it is a built-in."""
        from softlabels.teacher.models import BUILTIN_MODELS

        if override:
            return override
        spec = self.config.get("student")
        if isinstance(spec, str) and spec in BUILTIN_MODELS:
            return spec
        raise ConfigError(f"run {str(self.path)!r} records student {spec!r}, which is not a built-in model and is "
                          f"not loaded from a run's record; pass {flag} SPEC to name its architecture")

    def build(self, override: str | None = None, *, flag: str = "--student") -> nn.Module:
        """The run's student with its trained weights (eval mode, CPU; loaded with ``weights_only=True``)."""
        from softlabels.teacher.spec import resolve_model

        info = resolve_model(self.student_spec(override, flag=flag), input_shape=self.input_shape,
                             num_classes=self.num_classes, weights=self.weights)
        return info.module


def open_run(run: str | Path) -> Run:
    """Open a ``softlabels train --out`` directory: its ``model.pt`` and its checkpoint's config."""
    weights = run_weights(run)
    return Run(Path(run), weights, load_checkpoint(run)["config"])
