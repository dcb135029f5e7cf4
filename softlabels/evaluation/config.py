"""The frozen configs of ``softlabels eval`` and ``compress``, and the report formats (the command
line reads them from here; no torch or numpy, so ``--help`` stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass

from softlabels._runtime.options import bound_problems

REPORT_FORMATS = ("md", "html")
QUANTIZE = ("int8-weight", "int8-dynamic")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Every option of ``softlabels eval``."""

    checkpoint: str
    data: str
    store: str | None = None
    batch_size: int = 512
    device: str = "auto"
    threads: int = 1


@dataclass(frozen=True, kw_only=True)
class CompressConfig:
    """Every option of ``softlabels compress``."""

    run: str
    out: str
    data: str
    student: str | None = None
    store: str | None = None
    teacher: str | None = None
    teacher_spec: str | None = None
    prune: float | None = None
    prune_structured: float | None = None
    quantize: str | None = None
    finetune_stores: tuple[str, ...] = ()
    finetune_epochs: int = 1
    finetune_lr: float = 1e-3
    onnx: bool = False
    batch_size: int = 256
    repeats: int = 20
    seed: int = 0
    overwrite: bool = False

    def problems(self) -> list[str]:
        """Every invalid option value (empty when all are valid)."""
        p = []
        for name in ("prune", "prune_structured"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and 0 <= v < 1):
                p.append(f"--{name.replace('_', '-')} must be a fraction in [0, 1), got {v!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            p.append(f"unknown --quantize {self.quantize!r}; choose one of {', '.join(QUANTIZE)}")
        counts = {"finetune_epochs": self.finetune_epochs, "batch_size": self.batch_size,
                  "repeats": self.repeats}
        p += bound_problems("an integer >=", 1, counts)
        p += bound_problems("a number >", 0, {"finetune_lr": self.finetune_lr})
        from softlabels._runtime.paths import out_overlaps  # OUT is replaced whole: it may touch no input
        from softlabels.inputs.spec import data_spec_path

        inputs = [("RUN", self.run), ("--data", data_spec_path(self.data)), ("--store", self.store),
                  ("--teacher", self.teacher), *(("--finetune-store", s) for s in self.finetune_stores)]
        if clash := out_overlaps(self.out, inputs):
            p.append(clash)
        return p
