"""The frozen config of ``softlabels train``: every option, its default and its valid choices, which
the command line reads from here; it imports neither torch nor numpy, so ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from softlabels._runtime.options import bound_problems
from softlabels.teacher.config import DEFAULT_ENSEMBLE_MODE, ensemble_problems

LOSS_NAMES = ("kl", "soft_ce", "mse", "topk_kl", "sampled_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")



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
    # token data (softlabels.student.language): the tokenizer (vocabulary, text:FILE) and window length
    tokenizer: str | None = None
    seq_len: int | None = None
    # language models from top-k stores (library only): renormalise the K stored probabilities (no tail bucket)
    topk_renormalize: bool = False

    @property
    def token_data(self) -> bool:
        """Whether ``--data`` alone (no store) trains a language model on hard next-token CE."""
        from softlabels.teacher.lm import BUILTIN_LMS  # at call time: --help stays light

        return not self.stores and not self.ensemble and bool(self.data) and (
            self.student in BUILTIN_LMS or self.student.startswith("hf:") or self.tokenizer is not None
            or self.seq_len is not None or self.data[0].startswith("text:"))

    def problems(self, *, online: bool = False) -> list[str]:
        """Every invalid option value (empty when all are valid)."""
        counts = {"epochs": self.epochs, "batch_size": self.batch_size,
                  "views_per_sample": self.views_per_sample}
        if self.seq_len is not None:
            counts["seq_len"] = self.seq_len
        p = bound_problems("an integer >=", 1, counts)
        p += bound_problems("an integer >=", 0, {"warmup_steps": self.warmup_steps,
                                                 "num_workers": self.num_workers,
                                                 "threads": self.threads})
        p += bound_problems("a number >", 0, {"lr": self.lr})
        p += bound_problems("a number >=", 0, {"weight_decay": self.weight_decay})
        if self.optimizer not in OPTIMIZERS:
            p.append(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            p.append(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.loss is not None and self.loss not in LOSS_NAMES:
            p.append(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.temperature is not None:
            p += bound_problems("a number >", 0, {"temperature": self.temperature})
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
        from softlabels._runtime.paths import out_overlaps  # the library's, at call time: --help stays light
        from softlabels.inputs.spec import data_spec_path
        from softlabels.student.checkpoint import RUN_FILES
        from softlabels.teacher.spec import is_model_file

        inputs = [("--store", s) for s in self.stores] + [("--data", data_spec_path(d)) for d in self.data]
        inputs += [("--ensemble", s) for s in self.ensemble]
        inputs += [("--val-data", self.val_data and data_spec_path(self.val_data)),
                   ("--student-weights", self.student_weights),
                   ("--student", self.student if is_model_file(self.student) else None)]
        if clash := out_overlaps(self.out, inputs, writes=RUN_FILES):
            p.append(clash)
        return p
