"""A finished training run as an input: its weights and its recorded config.

``softlabels compress RUN`` and ``softlabels train --init RUN`` start from a run's ``model.pt``. Its
checkpoint records the student spec, input shape and class count; that record is data, so only a
built-in model name is rebuilt from it: anything else needs the spec on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from softlabels.errors import ConfigError, RunNotFound
from softlabels.student.checkpoint import MODEL, load_checkpoint

__all__ = ["Run", "open_run", "run_weights"]


def run_weights(run: str | Path) -> Path:
    """The ``model.pt`` of a training run directory (RunNotFound if there is none)."""
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
