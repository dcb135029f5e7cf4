"""One frozen config per command: every option, its default and its valid choices.

The command line reads its defaults and choices from these classes (nothing is
written twice), and the library functions take them or keyword arguments with the
same defaults (kept equal by a test). This module imports neither torch nor numpy,
so ``softlabels --help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AMP_MODES", "DEFAULT_ALPHA", "DEFAULT_ENSEMBLE_MODE", "DEFAULT_TEMPERATURE", "DEVICE_HELP", "ENSEMBLE_MODES",
    "EvalConfig", "FORMAT_VERSIONS", "GENERATE_LAYOUTS", "GenerateConfig", "MergeConfig", "ensemble_problems",
    "LAYOUTS", "LOGITS_DTYPES", "LOSS_NAMES", "ON_NONFINITE", "OPTIMIZERS", "REPORT_FORMATS", "SCHEDULES",
    "THREADS_HELP", "TrainConfig", "threads_problem",
]

# Choices. LAYOUTS and LOGITS_DTYPES equal softlabels.format's, LOSS_NAMES softlabels.losses.LOSSES'
# keys (tests/test_firstuse.py checks both): those modules need numpy and torch.
LAYOUTS = ("dense", "topk")
GENERATE_LAYOUTS = LAYOUTS + ("sampled",)  # sampled is written as format 2 (softlabels.layouts.LAYOUTS)
FORMAT_VERSIONS = (1, 2)
LOGITS_DTYPES = ("float32", "float16", "bfloat16")
LOSS_NAMES = ("kl", "soft_ce", "mse", "topk_kl", "sampled_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd")
AMP_MODES = ("none", "bf16", "fp16")
ON_NONFINITE = ("error", "record")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
REPORT_FORMATS = ("md", "html")
ENSEMBLE_MODES = ("arithmetic", "geometric")  # softlabels.ensemble.MODES (checked by a test)
DEFAULT_ENSEMBLE_MODE = "arithmetic"

DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 0.5
DEVICE_HELP = "Device to run on: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N."
THREADS_HELP = ("CPU threads torch may use in this process (0: torch's own default, one per core). One is "
                "fastest for small models, above all on a busy machine, and gives the same bits on every machine.")


def threads_problem(threads: Any) -> list[str]:
    if isinstance(threads, int) and threads >= 0:
        return []
    return [f"--threads must be an integer >= 0, got {threads!r}"]


MAX_VIEWS = 65_536
"""Most views per sample a store takes (FKD stores 500 crops, ImageNet+ up to 400)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every option of ``softlabels train``. ``None`` for loss/temperature/alpha means the default."""

    student: str
    out: str
    student_weights: str | None = None
    allow_pickle: bool = False
    stores: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    loss: str | None = None
    temperature: float | None = None
    alpha: float | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    threads: int = 1
    val_data: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: a bar on a terminal, one line per epoch otherwise
    init: str | None = None  # fine-tuning: start from this training run's model.pt (weights only)
    # one ensemble target combined from these stores of the same data, at the training T (docs/ENSEMBLES.md)
    ensemble: tuple[str, ...] = ()
    ensemble_mode: str = DEFAULT_ENSEMBLE_MODE
    ensemble_weights: tuple[float, ...] | None = None
    views_per_sample: int = 1  # views stores: train on k stored views of each input read (docs/VIEWS.md)
    augment: str | None = None  # a fresh view per sample and epoch, drawn from (seed, sample id, epoch)
    # token data (softlabels.lm.train): the tokenizer (vocabulary, text:FILE) and window length
    tokenizer: str | None = None
    seq_len: int | None = None

    @property
    def token_data(self) -> bool:
        """Whether ``--data`` alone (no store) trains a language model on hard next-token CE."""
        from softlabels.lm.models import BUILTIN_LMS  # at call time: --help stays light

        return not self.stores and not self.ensemble and bool(self.data) and (
            self.student in BUILTIN_LMS or self.student.startswith("hf:") or self.tokenizer is not None
            or self.seq_len is not None or self.data[0].startswith("text:"))

    def problems(self, *, online: bool = False) -> list[str]:
        """Every invalid option value (empty when all are valid)."""
        p = []
        for name in ("epochs", "batch_size", "views_per_sample"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                p.append(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.seq_len is not None and not (isinstance(self.seq_len, int) and self.seq_len >= 1):
            p.append(f"--seq-len must be an integer >= 1, got {self.seq_len!r}")
        for name in ("warmup_steps", "num_workers"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                p.append(f"--{name.replace('_', '-')} must be an integer >= 0, got {getattr(self, name)!r}")
        p += threads_problem(self.threads)
        if not (math.isfinite(self.lr) and self.lr > 0):
            p.append(f"--lr must be a number > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            p.append(f"--weight-decay must be a number >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            p.append(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            p.append(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.loss is not None and self.loss not in LOSS_NAMES:
            p.append(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            p.append(f"--temperature must be a number > 0, got {self.temperature!r}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            p.append(f"--alpha must be between 0 and 1, got {self.alpha!r}")
        if self.stores and self.data and len(self.data) != len(self.stores):
            p.append(f"{len(self.data)} --data for {len(self.stores)} --store; give --data once per store, "
                     "in the same order, or not at all (each store's recorded data spec is then used)")
        if not self.stores and not self.ensemble and self.views_per_sample != 1:
            p.append("--views-per-sample applies to views stores; pass --store, or drop --views-per-sample")
        if self.ensemble:
            p += ensemble_problems(self.ensemble, self.ensemble_mode, self.ensemble_weights, "--ensemble")
            if self.stores:
                p.append("--ensemble (one target combined from several stores of the same data) and --store "
                         "(datasets concatenated) exclude each other; pick one")
            if len(self.data) > 1:
                p.append(f"{len(self.data)} --data for one --ensemble; its stores hold the same data: give --data "
                         "once, or not at all")
        if not self.stores and not self.data and not self.ensemble:
            p.append("nothing to train on; pass --store (distillation) or --data (hard labels)")
        distils = self.stores or self.ensemble or online
        if not distils and (self.loss or self.temperature is not None or self.alpha is not None):
            p.append("--loss, --temperature and --alpha apply to distillation; pass --store, or drop them "
                     "to train on hard labels")
        if self.resume and self.overwrite:
            p.append("--resume and --overwrite exclude each other; pick one")
        if self.init and self.student_weights:
            p.append("--init and --student-weights both give initial weights; pick one")
        from softlabels._paths import out_overlaps  # the library's, at call time: --help stays light
        from softlabels.checkpoint import RUN_FILES
        from softlabels.specs import data_spec_path, is_model_file

        inputs = [("--store", s) for s in self.stores] + [("--data", data_spec_path(d)) for d in self.data]
        inputs += [("--ensemble", s) for s in self.ensemble]
        inputs += [("--val-data", self.val_data and data_spec_path(self.val_data)),
                   ("--student-weights", self.student_weights),
                   ("--student", self.student if is_model_file(self.student) else None)]
        clash = out_overlaps(self.out, inputs, writes=RUN_FILES)
        if clash:
            p.append(clash)
        return p


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Every option of ``softlabels generate`` (validated by :meth:`problems`).

    ``num_classes`` left ``None`` is the teacher's output width; ``progress=None``
    shows a bar on a terminal and periodic one-line progress otherwise. ``layout=None``
    is ``dense``, or ``topk`` with K = 5 for views (docs/VIEWS.md); ``format_version=None``
    is 2 when the request needs it (views, the sampled layout) or the store being resumed
    is version 2, else 1.
    """

    teacher: str
    data: str
    out: Path
    weights: str | None = None
    allow_pickle: bool = False
    random_teacher: bool = False
    seed: int = 0
    layout: str | None = None
    topk: int | None = None
    samples: int | None = None
    views: int | None = None
    augment: str | None = None
    views_from: str | None = None
    format_version: int | None = None
    dtype: str = "float32"
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    threads: int = 1
    amp: str = "none"
    chunk_rows: int | None = None
    shard_chunks: int | None = None
    num_classes: int | None = None
    overwrite: bool = False
    on_nonfinite: str = "error"
    repair: bool = False
    progress: bool | None = None
    # token data (softlabels.job.tokens): window length and tokenizer
    seq_len: int | None = None
    tokenizer: str | None = None
    compress: bool = False  # zstd (Zarr) / gzip + shuffle (HDF5) on the sparse layouts' arrays

    def problems(self) -> list[str]:
        from softlabels._paths import out_overlaps  # the library's, at call time: --help stays light
        from softlabels.models import BUILTIN_MODELS
        from softlabels.specs import data_spec_path, is_model_file

        p = []
        if self.teacher in BUILTIN_MODELS and self.weights is None and not self.random_teacher:
            p.append(f"--teacher {self.teacher} is an architecture without --weights, so it would label the data "
                     "with random weights; pass --weights FILE (e.g. a 'softlabels train' run's model.pt), or "
                     "--random-teacher for a random teacher seeded by --seed (for tests)")
        if self.random_teacher and self.weights is not None:
            p.append("--random-teacher and --weights exclude each other; pick one")
        if self.layout not in GENERATE_LAYOUTS:
            p.append(f"--layout must be one of {', '.join(GENERATE_LAYOUTS)}, got {self.layout!r}")
        if self.layout == "topk" and (self.topk < 1 if self.topk is not None else not self.viewed):
            p.append("--layout topk needs --topk K with K >= 1")  # views default to K = min(5, C)
        if self.layout == "dense" and self.topk is not None:
            p.append("--topk is only for --layout topk")
        if self.compress and self.layout == "dense":
            p.append("--compress is for the top-k and sampled layouts (dense logits compress ~1.1x); drop --compress")
        p += self._format2_problems()
        if self.dtype not in LOGITS_DTYPES:
            p.append(f"--dtype must be one of {', '.join(LOGITS_DTYPES)}, got {self.dtype!r}")
        if self.amp not in AMP_MODES:
            p.append(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            p.append(f"--on-nonfinite must be error or record, got {self.on_nonfinite!r}")
        for name in ("batch_size", "chunk_rows", "shard_chunks", "num_classes", "seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.num_workers < 0:
            p.append(f"--num-workers must be >= 0, got {self.num_workers}")
        p += threads_problem(self.threads)
        if self.out.suffix.lower() not in (".h5", ".hdf5", ".zarr"):
            p.append(f"--out must end in .h5, .hdf5 or .zarr, got {str(self.out)!r}")
        elif self.shard_chunks is not None and self.out.suffix.lower() != ".zarr":
            p.append("--shard-chunks needs a Zarr store (*.zarr)")
        clash = out_overlaps(self.out, [("--data", data_spec_path(self.data)), ("--weights", self.weights),
                                        ("--teacher", self.teacher if is_model_file(self.teacher) else None),
                                        ("--views-from", self.views_from)])
        if clash:
            p.append(clash)
        if self.repair and self.overwrite:
            p.append("--repair and --overwrite contradict each other (repair keeps the good chunks); pick one")
        return p

    def _format2_problems(self) -> list[str]:
        """The format-2 options (views, the sampled layout, --format) and how they fit together."""
        p = []
        if self.views is not None and not 1 <= self.views <= MAX_VIEWS:
            p.append(f"--views must lie in 1..{MAX_VIEWS}, got {self.views}")
        if self.views is not None and self.augment is None and self.views_from is None:
            p.append("--views needs --augment SPEC (how each view is drawn) or --views-from STORE; e.g. "
                     "--augment 'crop(32,padding=4)+flip'")
        if self.augment is not None and self.views is None and self.views_from is None:
            p.append("--augment needs --views V (views per sample); e.g. --views 8")
        if self.layout == "sampled" and (self.samples is None or self.samples < 1):
            p.append("--layout sampled needs --samples S with S >= 1 (draws per output)")
        if self.samples is not None and self.layout != "sampled":
            p.append("--samples is only for --layout sampled")
        if self.format_version not in (None, *FORMAT_VERSIONS):
            p.append(f"--format must be 1 or 2, got {self.format_version!r}")
        if self.format_version == 1 and (self.views is not None or self.views_from is not None
                                         or self.layout == "sampled"):
            p.append("format 1 holds one dense or top-k output per sample; drop --format 1 for views or the "
                     "sampled layout (they are written as format 2)")
        return p

    @property
    def viewed(self) -> bool:
        return self.views is not None or self.views_from is not None

    @property
    def needs_format2(self) -> bool:
        return self.viewed or self.layout == "sampled"

    def recorded(self, chunk_rows: int) -> dict[str, Any]:
        """The settings kept in ``created_by.settings`` (nothing that differs between ranks or runs)."""
        return {"batch_size": self.batch_size, "layout": self.layout, "topk": self.topk,
                "logits_dtype": self.dtype, "chunk_rows": chunk_rows, "shard_chunks": self.shard_chunks,
                "amp": self.amp, "num_workers": self.num_workers, "on_nonfinite": self.on_nonfinite,
                "seed": self.seed, "random_teacher": self.random_teacher}


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Every option of ``softlabels eval``."""

    checkpoint: str
    data: str
    store: str | None = None
    batch_size: int = 512
    device: str = "auto"
    threads: int = 1


# -- ensembles (softlabels.ensemble; docs/ENSEMBLES.md) ------------------------------------------
def ensemble_problems(stores: tuple[str, ...], mode: str, weights: tuple[float, ...] | None, flag: str) -> list[str]:
    """Problems with an ensemble's options that need no store opened."""
    p = []
    if len(stores) < 2:
        p.append(f"an ensemble needs at least 2 {flag}, got {len(stores)}; pass one {flag} per teacher's store")
    if mode not in ENSEMBLE_MODES:
        p.append(f"unknown ensemble mode {mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}")
    if weights is not None and len(weights) != len(stores):
        p.append(f"{len(weights)} ensemble weights for {len(stores)} stores; give one weight per store, in order")
    return p


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """Every option of ``softlabels merge``. ``temperature`` None: the training default T for dense and
    top-k stores (the arithmetic mean is exact at the T it is made for), 1 for sampled ones."""

    stores: tuple[str, ...]
    out: str
    mode: str = DEFAULT_ENSEMBLE_MODE
    weights: tuple[float, ...] | None = None
    temperature: float | None = None
    overwrite: bool = False

    def problems(self) -> list[str]:
        p = ensemble_problems(self.stores, self.mode, self.weights, "--store")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            p.append(f"--temperature must be a number > 0, got {self.temperature!r}")
        from softlabels._paths import out_overlaps  # at call time: --help stays light

        out = Path(self.out).resolve()
        if any(Path(s).resolve() == out for s in self.stores):
            p.append(f"--out {self.out!r} is also a --store; write the merged store to a new path")
        elif clash := out_overlaps(self.out, [("--store", str(s)) for s in self.stores]):
            p.append(clash)
        if Path(self.out).suffix.lower() not in (".h5", ".hdf5", ".zarr"):
            p.append(f"--out must end in .h5, .hdf5 or .zarr, got {str(self.out)!r}")
        return p
