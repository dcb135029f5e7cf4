"""Train a student language model from a ``tokens`` store: next-token CE mixed with a KD divergence.

Per batch, over the positions that count (``loss_mask``: inside the sequence, next token
a target), the loss is ``alpha * CE + (1 - alpha) * T^2 * D(teacher || student)`` averaged
over the *global* batch's positions; D is a loss of :data:`softlabels.student.losses.LOSSES` on the
layout's typed target (forward KL with the layout's estimator by default). ``softlabels
train`` dispatches here when its store holds ``tokens`` positions (:func:`is_token_store`).

Run directory, checkpoint and resume are the classifier trainer's (:mod:`softlabels.student.checkpoint`,
one checkpoint per epoch). Under torchrun every rank takes its slice of each global batch
(:class:`~softlabels.student.token_dataset.TokenStoreDataset`) and scales its position sum by
``world / global positions``, so DDP's gradient mean equals the one-process gradient of
the same global batch; every rank runs the same number of steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from softlabels._runtime.device import DistEnv, set_threads
from softlabels.errors import ConfigError, NonFiniteOutputs
from softlabels.inputs.loader import batch_loader
from softlabels.store.defaults import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
from softlabels.store.layouts.targets import TopKTarget
from softlabels.student import checkpoint as ckpt_io
from softlabels.student.config import TrainConfig
from softlabels.student.losses import make_soft_loss
from softlabels.student.token_dataset import (
    TokenDataBatches,
    TokenStoreDataset,
    batch_target,
    select_rows,
)
from softlabels.student.trainutil import lr_factor, weights_digest

__all__ = ["is_token_store", "train_lm", "lm_loss", "resolve_store_data"]

_RESUME_KEYS = ("student", "student_weights", "data", "loss", "temperature", "alpha", "batch_size", "lr",
                "optimizer", "weight_decay", "schedule", "warmup_steps", "seed", "init", "topk_renormalize",
                "store_identity")


def is_token_store(path: str | Path) -> bool:
    """Whether ``path`` is a format-v2 store of ``tokens`` positions (False for anything unreadable)."""
    from softlabels.store.backend import open_backend

    try:
        backend = open_backend(path, "r")
        try:
            attrs = backend.attrs()
        finally:
            backend.close()
    except Exception:  # noqa: BLE001 - not ours to report: the classifier path says what is wrong
        return False
    return attrs.get("softlabels_format") == 2 and attrs.get("positions") == "tokens"


def resolve_store_data(store: Any, spec: str | None = None, *, tokenizer: str | None = None,
                       seq_len: int | None = None):
    """The token data of a store: ``spec`` or the store's recorded ``source.spec`` (with its tokenizer and seq_len)."""
    from softlabels.inputs.text import resolve_token_data

    source = store.meta.source
    spec = spec or source.get("spec")
    if not spec:
        raise ConfigError(f"store {str(store.path)!r} does not record its token data; pass --data for it")
    tokenizer = tokenizer or source.get("tokenizer")
    if seq_len is None:  # the windows the store's positions belong to (text, a stream, or re-windowed rows)
        seq_len = source.get("seq_len")
    return spec, tokenizer, seq_len, resolve_token_data(spec, tokenizer=tokenizer, seq_len=seq_len)


def lm_loss(logits: torch.Tensor, batch: dict[str, Any], layout: str, soft: nn.Module | None, alpha: float,
            renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over the batch's counted positions: ``(weighted total, hard CE, soft loss incl. T^2)``.

    ``soft=None`` or ``alpha == 1``: hard CE only. ``renormalize``: a top-k target's mass is
    renormalised over its K ids (no tail bucket), as most top-k KD implementations do.
    """
    index = batch["index"]
    keep = batch["loss_mask"].reshape(-1)[index]
    rows = index[keep]
    s = logits.reshape(-1, logits.shape[-1])[rows]
    labels = batch["targets"].reshape(-1)[rows]
    zero = s.new_zeros((), dtype=torch.float32)
    if soft is None or alpha == 1:
        ce = F.cross_entropy(s.float(), labels, reduction="sum")
        return alpha * ce if soft is not None else ce, ce.detach(), zero
    target = select_rows(batch_target(batch, layout), keep)
    if renormalize and isinstance(target, TopKTarget):
        target = dataclasses.replace(target, logsumexp=target.values.float().logsumexp(-1))
    fused = getattr(soft, "rows_with_ce", None) if alpha > 0 else None
    if fused is not None:  # one pass over the student's logits for both terms
        soft_rows, ce_rows = fused(s, target, labels)
    else:
        soft_rows = soft(s, target)
        ce_rows = F.cross_entropy(s.float(), labels, reduction="none") if alpha > 0 else soft_rows.new_zeros(0)
    ce, sl = ce_rows.sum(), soft_rows.sum()
    return alpha * ce + (1 - alpha) * sl, ce.detach(), sl.detach()


def train_lm(config: TrainConfig, *, log: Callable[[str], None] | None = None,
             on_epoch_end: Callable[[dict[str, Any]], None] | None = None, tokenizer: str | None = None,
             seq_len: int | None = None, topk_renormalize: bool = False) -> dict[str, Any]:
    """Train the LM student of ``config`` from its one ``tokens`` store; return the run summary."""
    from softlabels.store.lock import StoreLock

    problems = config.problems()
    if len(config.stores) > 1 or (not config.stores and len(config.data) != 1):
        problems.append(f"a language model trains from one token store, or from one --data on hard next-token CE "
                        f"alone; got {len(config.stores)} --store and {len(config.data)} --data")
    if config.val_data:
        problems.append("--val-data is not used for language models; evaluate a run with 'softlabels eval "
                        "--checkpoint RUN --data HELD_OUT'")
    if problems:
        raise ConfigError(problems)
    set_threads(config.threads)
    env = DistEnv.start(config.device)
    lock = StoreLock(config.out)
    try:
        run, error = None, None
        try:
            if env.rank == 0:
                lock.acquire()
            run = _LMRun(config, env, log if env.rank == 0 else None, tokenizer, seq_len, topk_renormalize)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
        env.group.agree(error)
        try:
            run.connect()
            return run.fit(on_epoch_end)
        finally:
            if run.store is not None:
                run.store.close()
    finally:
        lock.release()
        env.stop()


class _LMRun:
    def __init__(self, config: TrainConfig, env: DistEnv, log, tokenizer, seq_len, renormalize: bool) -> None:
        from softlabels.inputs.text import resolve_token_data
        from softlabels.store.reader import UnitStore
        from softlabels.student.runs import run_weights
        from softlabels.teacher.lm import resolve_lm

        self.config, self.env, self.log = config, env, log or (lambda _msg: None)
        self.resume_from = ckpt_io.check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite)
        tokenizer, seq_len = tokenizer or config.tokenizer, seq_len or config.seq_len
        self.store = UnitStore(config.stores[0]) if config.stores else None
        if self.store is None:  # hard next-token CE alone: the teacher itself, or the baseline student
            spec = config.data[0]
            data = resolve_token_data(spec, tokenizer=tokenizer, seq_len=seq_len)
            tokenizer = tokenizer and str(Path(tokenizer).resolve())  # recorded for eval, from any directory
            self.ds = TokenDataBatches(data, batch_size=config.batch_size, seed=config.seed, rank=env.rank,
                                       world_size=env.world)
        else:
            spec, tokenizer, seq_len, data = resolve_store_data(
                self.store, config.data[0] if config.data else None, tokenizer=tokenizer, seq_len=seq_len)
            self.ds = TokenStoreDataset(self.store, data, batch_size=config.batch_size, seed=config.seed,
                                        rank=env.rank, world_size=env.world)
        self.layout, vocab = self.ds.layout, self.ds.num_classes
        context = int(data.lengths().max())
        temperature = DEFAULT_TEMPERATURE if config.temperature is None else config.temperature
        self.alpha = 1.0 if self.store is None else DEFAULT_ALPHA if config.alpha is None else config.alpha
        loss_name = config.loss or (self.store.meta.layout_obj().default_loss if self.store else "hard_ce")
        soft = make_soft_loss(loss_name, temperature) if self.store else None
        if loss_name in ("soft_ce", "mse"):
            raise ConfigError(f"loss {loss_name!r} is not available for language models; use kl, topk_kl, "
                              "sampled_kl, reverse_kl, skew_kl, skew_reverse_kl or jsd")
        self.soft, self.renormalize = soft, renormalize
        init = run_weights(config.init) if config.init else config.student_weights
        torch.manual_seed(config.seed)
        info = resolve_lm(config.student, vocab_size=vocab, context=context, seed=config.seed, weights=init)
        self.student = info.module.to(env.device).train()
        self.net = info.module.model  # what is saved: the model's own state_dict, loadable by resolve_lm
        params = self.student.parameters()
        if config.optimizer == "adamw":
            self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        self.loader = batch_loader(self.ds, num_workers=config.num_workers, pin_memory=env.device.type == "cuda")
        meta = self.store.meta if self.store is not None else None
        self.run_config = {
            **{k: v for k, v in asdict(config).items() if k not in ("resume", "overwrite", "progress", "allow_pickle")},
            "task": "lm", "stores": [str(Path(p).resolve()) for p in config.stores], "data": [spec],
            "tokenizer": tokenizer, "seq_len": seq_len, "loss": loss_name, "temperature": temperature,
            "alpha": self.alpha, "topk_renormalize": bool(renormalize), "input_shape": [context],
            "num_classes": vocab, "layout": self.layout, "world_size": env.world, "student_kind": info.kind,
            "student_weights_sha256": info.weights_sha256, "num_parameters": info.num_parameters,
            "store_identity": None if meta is None else {
                "teacher": meta.teacher, "layout": meta.layout, "layout_params": meta.layout_params,
                "logits_dtype": meta.logits_dtype, "num_samples": meta.num_samples,
                "num_classes": meta.num_classes, "fingerprint": meta.source.get("fingerprint")},
        }
        self.state = None
        if self.resume_from is not None:
            self.state = ckpt_io.load_checkpoint(self.resume_from)
            old = self.state["config"]
            diffs = [f"{k}: {old.get(k)!r} -> {self.run_config[k]!r}" for k in _RESUME_KEYS
                     if old.get(k) != self.run_config[k]]
            if diffs:
                raise ConfigError(f"--resume with other settings than {self.resume_from} ({'; '.join(diffs)}); "
                                  "rerun with the original options, or pass --overwrite to start over")

    def connect(self) -> None:
        config, env = self.config, self.env
        self.steps_per_epoch = self.run_config["steps_per_epoch"] = len(self.ds)  # equal on every rank
        self.model = self.student
        if env.world > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_factor(config.schedule, config.warmup_steps, config.epochs * self.steps_per_epoch))
        self.start_epoch, self.step = 0, 0
        if env.rank == 0:
            ckpt_io.start_out_dir(config.out, keep=self.state is not None)
        if self.state is not None:
            s = self.state
            self.net.load_state_dict(s["model"])
            self.opt.load_state_dict(s["optimizer"])
            self.sched.load_state_dict(s["scheduler"])
            ckpt_io.set_rng_state(s["rng"])
            self.start_epoch, self.step = int(s["epoch"]), int(s["step"])
            if env.rank == 0:
                ckpt_io.truncate_metrics(config.out, self.start_epoch)
            self.log(f"resuming {config.out} after epoch {self.start_epoch} (step {self.step})")

    def _epoch(self, epoch: int) -> dict[str, Any]:
        env = self.env
        self.ds.set_epoch(epoch)
        sums = torch.zeros(4, dtype=torch.float64)  # total, hard, soft (position sums), positions
        t0 = time.perf_counter()
        it, last = iter(self.loader), None
        for _ in range(self.steps_per_epoch):
            batch = next(it)
            weight = 1.0
            if batch["ids"].shape[0] == 0:  # this rank's slice of the last global batch is empty
                batch, weight = last, 0.0
            else:
                batch = last = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
            total, hard, soft = lm_loss(self.model(batch["ids"]), batch, self.layout, self.soft, self.alpha,
                                        self.renormalize)
            count = batch["loss_mask"].sum().double().cpu() * weight
            # the global batch's positions: every rank divides its sum by the same number
            n = env.all_reduce(count.clone()).item() if env.world > 1 else count.item()
            scale = weight * env.world / max(n, 1.0)
            self.opt.zero_grad(set_to_none=True)
            (total * scale).backward()
            self.opt.step()
            self.sched.step()
            self.step += 1
            sums[:3] += torch.stack([total.detach().double().cpu(), hard.double().cpu(), soft.double().cpu()]) * weight
            sums[3] += count
        total = env.all_reduce(sums).tolist()
        seconds = time.perf_counter() - t0
        n = max(total[3], 1.0)
        return {"epoch": epoch + 1, "step": self.step, "loss": total[0] / n, "loss_hard": total[1] / n,
                "loss_soft": total[2] / n, "lr": self.sched.get_last_lr()[0], "positions": int(total[3]),
                "epoch_seconds": seconds, "positions_per_s": total[3] / seconds}

    def _save(self, epoch_done: int) -> None:
        ckpt_io.save_run(self.config.out, self.net, self.opt, self.sched, epoch=epoch_done, step=self.step,
                         config=self.run_config)

    def fit(self, on_epoch_end) -> dict[str, Any]:
        cfg, env = self.config, self.env
        t_start = time.perf_counter()
        source = f"{cfg.stores[0]} ({self.layout})" if cfg.stores else f"{cfg.data[0]} (hard next-token CE only)"
        self.log(f"training {cfg.student} ({self.run_config['num_parameters']:,} parameters) from "
                 f"{source}, loss {self.run_config['loss']}, alpha {self.alpha}; "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {env.world} x {env.device}")
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self._epoch(epoch)
            if not math.isfinite(record["loss"]):
                raise NonFiniteOutputs(f"training diverged: loss {record['loss']} in epoch {epoch + 1}; lower --lr")
            if env.rank == 0:
                ckpt_io.append_metrics(cfg.out, record)
                self._save(epoch + 1)
                self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} (hard "
                         f"{record['loss_hard']:.4f}, soft {record['loss_soft']:.4f})")
            if on_epoch_end is not None:
                on_epoch_end(record)
        return self._finish(time.perf_counter() - t_start)

    def _finish(self, seconds: float) -> dict[str, Any]:
        from softlabels.student.trainer import _json

        env, cfg = self.env, self.config
        digest = weights_digest(self.net)
        digests = [digest]
        if env.world > 1:
            digests = [None] * env.world
            dist.all_gather_object(digests, digest)
        history = ckpt_io.read_metrics(cfg.out) if env.rank == 0 else []
        summary = {"student": cfg.student, "out": str(cfg.out), "epochs": cfg.epochs, "steps": self.step,
                   "world_size": env.world, "num_parameters": self.run_config["num_parameters"], "seconds": seconds,
                   "final": history[-1] if history else {}, "first_loss": history[0]["loss"] if history else None,
                   "weights_digest": digest, "weights_digest_per_rank": digests, "config": self.run_config}
        if env.rank == 0:
            ckpt_io.atomic_write_text(Path(cfg.out) / ckpt_io.SUMMARY, _json(summary))
            self.log(f"done: {cfg.epochs} epochs, {self.step} steps in {seconds:.1f}s; loss "
                     f"{summary['final'].get('loss', float('nan')):.4f}; wrote {cfg.out}/{ckpt_io.MODEL}")
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks finished with different weights ({digests}); this is a bug")
        env.barrier()
        return summary
