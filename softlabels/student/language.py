"""The language-model task of the trainer: a ``tokens`` store, or token data alone (hard next-token CE).

Per batch, over the positions that count (``loss_mask``), the loss is ``alpha * CE + (1 - alpha) *
T^2 * D(teacher || student)`` averaged over the *global* batch's positions, D a loss of
:data:`softlabels.student.losses.LOSSES` on the layout's typed target. Each rank takes its slice of
each global batch (:mod:`softlabels.student.kinds.tokens`) and scales its position sum by ``world /
global positions``, so DDP's gradient mean is the one-process gradient of the global batch. What is
saved is the model's own ``state_dict``, which :func:`~softlabels.teacher.lm.resolve_lm` loads.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softlabels.errors import ConfigError, ModelMismatch
from softlabels.student.config import TrainConfig
from softlabels.student.kinds.tokens import data_batch, lm_loss
from softlabels.student.losses import make_soft_loss
from softlabels.student.trainutil import Task, distillation_settings

__all__ = ["Language", "check_student_width", "is_language_run"]


def is_language_run(config: TrainConfig, *, online: bool = False) -> bool:
    """Whether ``config`` trains a language model: its store is a format-v2 store of ``tokens``
    positions, or its ``--data`` alone is token data (:attr:`TrainConfig.token_data`)."""
    if online:
        return False
    if not config.stores:
        return config.token_data
    from softlabels.store.backend import open_backend

    try:
        with contextlib.closing(open_backend(config.stores[0], "r")) as backend:
            attrs = backend.attrs()
    except Exception:  # noqa: BLE001 - not ours to report: the classifier path says what is wrong
        return False
    if attrs.get("softlabels_format") != 2 or attrs.get("positions") != "tokens":
        return False
    if config.augment:
        raise ConfigError(f"--augment draws image views, but {config.stores[0]} holds per-token targets "
                          "of a language model; drop --augment")
    return True


def _check_tokenizers(store: Any, config: TrainConfig) -> None:
    """The tokenizers a run names (``--tokenizer``, an ``hf:`` student's or ``--init``'s own) against the
    one ``store`` was generated with (its recorded fingerprint)."""
    from softlabels.inputs.text import teacher_tokenizer
    from softlabels.inputs.vocabulary import check_same_tokenizer

    expected = store.meta.source.get("tokenizer_fingerprint")
    check_same_tokenizer(expected, config.tokenizer, what="--tokenizer", store=str(store.path))
    for spec in (config.student, config.init):
        if str(spec).startswith("hf:"):
            check_same_tokenizer(expected, teacher_tokenizer(spec), what=f"the tokenizer of {spec}",
                                 store=str(store.path))


class Language(Task):
    """Data, student and loss of a language-model run (what :class:`~softlabels.student.trainer` asks of a task)."""

    unit = "positions"
    resume_keys = {"topk_renormalize": None}

    @staticmethod
    def problems(config: TrainConfig, *, online: bool = False) -> list[str]:
        problems = Task.problems(config)
        if len(config.stores) > 1 or (not config.stores and len(config.data) != 1):
            problems.append(f"a language model trains from one token store, or from one --data on hard next-token "
                            f"CE alone; got {len(config.stores)} --store and {len(config.data)} --data")
        if config.val_data:
            problems.append("--val-data is not used for language models; evaluate a run with 'softlabels eval "
                            "--checkpoint RUN --data HELD_OUT'")
        return problems

    def __init__(self, config: TrainConfig, env: Any, log, **_: Any) -> None:
        from softlabels.inputs.text import resolve_token_data, teacher_tokenizer
        from softlabels.store.reader import open_store
        from softlabels.student.checkpoint import run_weights
        from softlabels.student.dataset import DataBatches, SoftLabelDataset
        from softlabels.teacher.lm import resolve_lm

        self.config, self.env, self.epoch = config, env, 0
        tokenizer, seq_len = config.tokenizer, config.seq_len
        self.stores = [open_store(config.stores[0])] if config.stores else []
        try:
            if not self.stores:  # hard next-token CE alone: the teacher itself, or the baseline student
                spec = config.data[0]
                tokenizer = tokenizer or teacher_tokenizer(config.student, spec)  # an hf: student's own
                data = resolve_token_data(spec, tokenizer=tokenizer, seq_len=seq_len)
                tokenizer = tokenizer and str(Path(tokenizer).resolve())  # recorded for eval, from any directory
                if data.vocab_size is None:
                    raise ConfigError(f"the vocabulary size of {data.source} is unknown; pass "
                                      "--tokenizer tokenizer.json (the tokenizer the ids come "
                                      "from)")
                self.batches: Any = DataBatches(np.arange(len(data)), partial(data_batch, data),
                                                share="batches", batch_size=config.batch_size,
                                                seed=config.seed, rank=env.rank, world=env.world)
                layout, vocab = None, int(data.vocab_size)
            else:
                source = self.stores[0].meta.source  # the recorded data, its tokenizer and windows
                spec = (config.data[0] if config.data else None) or source.get("spec")
                if not spec:
                    raise ConfigError(f"store {str(self.stores[0].path)!r} does not record its "
                                      "token data; pass --data for it")
                tokenizer = tokenizer or source.get("tokenizer")
                seq_len = source.get("seq_len") if seq_len is None else seq_len
                data = resolve_token_data(spec, tokenizer=tokenizer, seq_len=seq_len)
                self.batches = SoftLabelDataset([(self.stores[0], data)], batch_size=config.batch_size,
                                                seed=config.seed, rank=env.rank, world_size=env.world)
                layout, vocab = self.batches.layout, self.batches.num_classes
                _check_tokenizers(self.stores[0], config)
            context = int(data.lengths().max())
            temperature, self.alpha = distillation_settings(config.temperature, config.alpha, self.stores, log) \
                if self.stores else (None, 1.0)
            loss_name = config.loss or (self.stores[0].meta.layout_obj().default_loss if self.stores else "hard_ce")
            self.soft = make_soft_loss(loss_name, temperature) if self.stores else None
            if self.soft is not None and self.alpha < 1:  # a merged arithmetic store is exact at its T only
                from softlabels.store.ensemble import check_temperature

                check_temperature(self.stores[0].meta, temperature, str(self.stores[0].path))
            if loss_name in ("soft_ce", "mse"):
                raise ConfigError(f"loss {loss_name!r} is not available for language models; use kl, topk_kl, "
                                  "sampled_kl, reverse_kl, skew_kl, skew_reverse_kl or jsd")
            init = config.init if str(config.init).startswith("hf:") else run_weights(config.init) if config.init \
                else config.student_weights
            torch.manual_seed(config.seed)
            self.info = resolve_lm(config.student, vocab_size=vocab, context=context, seed=config.seed, weights=init)
            if self.stores:
                check_student_width(config.student, self.info.vocab_size, self.stores[0].path, vocab)
        except BaseException:
            self.close()
            raise
        self.student = self.info.module.to(env.device).train()
        self.net = self.info.module.model  # what is saved: the model's own state_dict, loadable by resolve_lm
        self.tokenizer = tokenizer or teacher_tokenizer(config.student)  # what RUN/hf ships beside the weights
        self.source = f"{config.stores[0]} ({layout})" if self.stores else f"{spec} (hard next-token CE only)"
        self.run_config = {
            "task": "lm", "data": [spec], "tokenizer": tokenizer, "seq_len": seq_len, "loss": loss_name,
            "temperature": temperature, "alpha": self.alpha, "topk_renormalize": bool(config.topk_renormalize),
            "input_shape": [context], "num_classes": vocab, "layout": layout}

    # -- what the trainer asks per batch ----------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any], weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss to back-propagate (its position sum over the global batch's positions, times the
        world size), and its (total, hard, soft, positions) sums for the metrics."""
        env = self.env
        total, hard, soft = lm_loss(model(batch["ids"]), batch, self.soft, self.alpha,
                                    self.config.topk_renormalize)
        count = batch["loss_mask"].sum().double().cpu() * weight
        # the global batch's positions: every rank divides its sum by the same number
        n = env.all_reduce(count.clone()).item() if env.world > 1 else count.item()
        scale = weight * env.world / max(n, 1.0)
        sums = torch.cat([torch.stack([total.detach().double().cpu(), hard.double().cpu(), soft.double().cpu()])
                          * weight, count.reshape(1)])
        return total * scale, sums.to(env.device)

    def export(self, out: str) -> None:
        """With an ``hf:`` student: ``out/hf``, loadable by ``AutoModelForCausalLM.from_pretrained``."""
        if self.info.kind == "hf":
            from softlabels.student.checkpoint import save_hf

            save_hf(self.net, out, self.tokenizer)

    def describe(self) -> str:
        return f"from {self.source}, loss {self.run_config['loss']}, alpha {self.alpha}"


def check_student_width(spec: str, width: int, store: object, classes: int) -> None:
    """A student distils a store only over the store's classes: every layout needs its output width to be
    the store's C (a wider, padded head would hide probability mass in ids no target names)."""
    if width != classes:
        raise ModelMismatch(f"student '{spec}' outputs {width} logits per token but {store} holds {classes} "
                            "classes; distil into a student with the teacher's output width (its vocabulary)")
