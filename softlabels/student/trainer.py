"""The student trainer: one loop for classifiers and language models, from stores or on hard labels.

:func:`train` runs the *task* the config describes (:mod:`~softlabels.student.classifier`: ``sample``/
``views`` stores or labeled ``--data``; :mod:`~softlabels.student.language`: a ``tokens`` store or token
data alone), which owns the data, the student and the loss of one batch; the rest is here. Under
``torchrun`` the student is wrapped in DDP, each rank streams its share of the batches, and only rank
0 writes files (:mod:`softlabels.student.checkpoint`) or prints. Every rank runs the same number of
optimizer steps per epoch, a rank out of data repeating its last batch with loss weight 0: with
DDP's ``Join`` the early rank would skip steps, and Adam's moments and the LR schedule would drift
apart between ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from softlabels._runtime import signals as _signals
from softlabels._runtime.device import DistEnv, set_threads
from softlabels._runtime.paths import resolved
from softlabels._runtime.progress import progress_bar, wants_bar
from softlabels.errors import CheckpointError, ConfigError, DataError, NonFiniteOutputs, StoreMismatch
from softlabels.inputs.loader import batch_loader
from softlabels.store import format as fmt
from softlabels.student import checkpoint as ckpt_io
from softlabels.student.config import TrainConfig

__all__ = ["TrainConfig", "train", "weights_digest"]

# options that must equal the checkpoint's for --resume to continue the same run (each task adds its
# own; the stores are compared by identity, not path: see store_identity)
RESUME_KEYS = ("student", "student_weights", "data", "loss", "temperature", "alpha", "batch_size", "lr", "optimizer",
               "weight_decay", "schedule", "warmup_steps", "seed", "init")


def train(config: TrainConfig, *, teacher: nn.Module | None = None, log: Callable[[str], None] | None = None,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          student: nn.Module | None = None) -> dict[str, Any]:
    """Train the student described by ``config``; return the run summary (also in ``summary.json``).

    ``teacher``: distil from this module's logits on each batch (online, a classifier). ``log``: progress
    lines (rank 0). ``on_epoch_end(record)``: called on every rank after each epoch's checkpoint; an
    exception there stops training. ``student``: train this classifier (a pruned one, say) instead of
    building ``config.student``, which then only names it.
    """
    from softlabels.student.language import is_language_run

    if is_language_run(config, online=teacher is not None or student is not None):
        from softlabels.student.language import Language as task
    else:
        from softlabels.student.classifier import Classifier as task
    problems = task.problems(config, online=teacher is not None)
    if problems:
        raise ConfigError(problems)
    set_threads(config.threads)
    from softlabels.store.lock import StoreLock

    env = DistEnv.start(config.device)
    lock = StoreLock(config.out)  # one run per --out: a second one would interleave its files
    try:
        run, error = None, None
        try:
            if env.rank == 0:
                lock.acquire()
            run = _Run(config, env, log if env.rank == 0 else None, task, teacher=teacher, student=student)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
        env.group.agree(error)  # one rank's setup error stops all ranks, none waits forever
        try:
            run.connect()
            return run.fit(on_epoch_end)
        finally:
            run.task.close()
    finally:
        lock.release()


class _Run:
    """One training run: a task (data, student, loss), its optimizer and schedule, the out dir."""

    def __init__(self, config: TrainConfig, env: DistEnv, log, task: type, **task_kw: Any) -> None:
        self.config, self.env, self.log = config, env, log or (lambda _msg: None)
        # rank 0: a bar on a terminal (or with progress=True); in a log, a line every LINE_EVERY_S s and per epoch
        self.bar_shown = env.rank == 0 and wants_bar(config.progress)
        self.lines_shown = env.rank == 0 and not self.bar_shown and config.progress is None
        self.resume_from = ckpt_io.check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite)
        self.task = task(config, env, self.log, **task_kw)
        info = self.task.info
        if config.init:
            self.log(f"starting from the weights of {config.init} (sha256 {info.weights_sha256[:12]}); new optimizer")
        params = self.task.student.parameters()
        if config.optimizer == "adamw":
            self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        self.loader = batch_loader(self.task.batches, num_workers=config.num_workers,
                                   pin_memory=env.device.type == "cuda")
        stores = self.task.stores
        self.run_config = {
            **{k: v for k, v in asdict(config).items() if k not in ("resume", "overwrite", "progress", "allow_pickle")},
            "stores": [resolved(p) for p in config.stores], "world_size": env.world,
            "student_kind": info.kind, "student_weights_sha256": info.weights_sha256,
            "num_parameters": info.num_parameters,
            "teachers": [{"store": resolved(s.path), "layout": s.meta.layout,
                          "num_samples": s.meta.num_samples, "num_classes": s.meta.num_classes,
                          "logits_dtype": s.meta.logits_dtype, "teacher": s.meta.teacher,
                          "source": s.meta.source} for s in stores],
            "store_identity": [store_identity(s) for s in stores],
            **self.task.run_config,
        }
        self.state = None
        if self.resume_from is not None:
            self.state = ckpt_io.load_checkpoint(self.resume_from)
            self._check_resume(self.state["config"])

    def _check_resume(self, old: dict[str, Any]) -> None:
        # each key with its value in runs from before it existed; runs before stores had an identity: their paths
        keys = dict.fromkeys(RESUME_KEYS) | self.task.resume_keys
        if isinstance(old.get("store_identity"), list):
            _check_same_stores(old["store_identity"], self.run_config["store_identity"], self.config.out)
        else:
            keys = {"stores": None, **keys}
        diffs = [f"{k}: {old.get(k, v)!r} -> {self.run_config[k]!r}" for k, v in keys.items()
                 if old.get(k, v) != self.run_config[k]]
        if diffs:
            raise ConfigError(f"--resume with other settings than {self.resume_from} ({'; '.join(diffs)}); "
                              "rerun with the original options, or pass --overwrite to start over")

    def connect(self) -> None:
        """The collective part of the setup: step count, DDP, schedule, resumed state."""
        config, env = self.config, self.env
        local = len(self.task.batches)
        hi, neg_lo = env.all_reduce(torch.tensor([local, -local], dtype=torch.int64), dist.ReduceOp.MAX).tolist()
        if -neg_lo < 1:
            raise DataError(f"a rank got no rows to train on; use fewer processes than the {config.batch_size}"
                            "-row batches the data holds")
        self.steps_per_epoch = self.run_config["steps_per_epoch"] = hi
        self.model = self.task.student
        if env.world > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.task.student, device_ids=ids)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_factor(config.schedule, config.warmup_steps, config.epochs * hi))
        self.start_epoch, self.step = 0, 0
        if env.rank == 0:  # only now that every rank's setup succeeded: an earlier run is replaced
            ckpt_io.start_out_dir(config.out, keep=self.state is not None)
        if self.state is not None:
            self._restore(self.state)
        elif config.resume:
            self.log(f"--resume: no checkpoint in {config.out}; starting a new run")

    def _restore(self, state: dict[str, Any]) -> None:
        old = state["config"]
        if old.get("world_size") != self.env.world:
            self.log(f"note: resuming a {old.get('world_size')}-process run on {self.env.world} processes; "
                     "the data split per rank changes")
        try:  # well-formed fields (checked on load) that still do not fit this student
            self.task.net.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            ckpt_io.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:
            raise CheckpointError(f"checkpoint {str(self.resume_from)!r} does not fit this run "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:160]}); start over "
                                  "with --overwrite") from None
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.env.rank == 0:
            ckpt_io.truncate_metrics(self.config.out, self.start_epoch)
        self.log(f"resuming {self.config.out} after epoch {self.start_epoch} (step {self.step})")

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, env, task = self.config, self.env, self.task
        task.batches.set_epoch(epoch)  # len() may be 0
        task.epoch = epoch
        sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, hard, soft, rows (or positions)
        bar = progress_bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batches",
                           show=self.bar_shown, say=self.log if self.lines_shown else (lambda _line: None),
                           leave=False)
        every = max(1, self.steps_per_epoch // 50)
        t0 = time.perf_counter()
        it, last = iter(self.loader), None
        for i in range(self.steps_per_epoch):
            _signals.check()  # a stop signal whose KeyboardInterrupt was swallowed
            batch = next(it, None)
            weight = 1.0
            if batch is None or len(batch["sample_ids"]) == 0:  # out of rows: a zero-weight step
                batch, weight = last, 0.0
            else:
                batch = last = task.to_device(batch)
            loss, parts = task.loss(self.model, batch, weight)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.step += 1
            sums += parts
            if (i + 1) % every == 0 and (self.bar_shown or self.lines_shown):
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / max(s[3], 1):.4f}",
                                **{f"{task.unit}_s": f"{s[3] * env.world / (time.perf_counter() - t0):.0f}"})
            bar.update()
        bar.close()
        for _ in it:  # never expected: the dataset yielded more batches than len() said
            raise DataError("the soft-label dataset yielded more batches than it announced; this is a bug")
        total = env.all_reduce(sums.cpu()).tolist()
        seconds = time.perf_counter() - t0
        rows = max(total[3], 1)
        return {"epoch": epoch + 1, "step": self.step, "loss": total[0] / rows, "loss_hard": total[1] / rows,
                "loss_soft": total[2] / rows, "lr": self.sched.get_last_lr()[0], task.unit: int(total[3]),
                "epoch_seconds": seconds, f"{task.unit}_per_s": total[3] / seconds}

    def fit(self, on_epoch_end) -> dict[str, Any]:
        cfg, env = self.config, self.env
        t_start = time.perf_counter()
        self.log(f"training {cfg.student} ({self.run_config['num_parameters']:,} parameters) {self.task.describe()}; "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {env.world} x {env.device}")
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self._epoch(epoch)
            if not math.isfinite(record["loss"]):  # same on every rank (all-reduced): all stop together
                kept = f" (the checkpoint after epoch {epoch} is kept)" if epoch else ""
                self._check_stores_finite()
                raise NonFiniteOutputs(f"training diverged: loss {record['loss']} in epoch {epoch + 1}; "
                                       f"lower --lr{kept}")
            if env.rank == 0:
                self.task.validate(record)
                ckpt_io.append_metrics(cfg.out, record)  # before the checkpoint: a resume rewrites it
                ckpt_io.save_run(cfg.out, self.task.net, self.opt, self.sched, epoch=epoch + 1, step=self.step,
                                 config=self.run_config)
                self.task.export(cfg.out)
                val = f", val acc {record['val_accuracy']:.4f}" if record.get("val_accuracy") is not None else ""
                if not self.bar_shown:  # the bar shows progress otherwise
                    self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} (hard "
                             f"{record['loss_hard']:.4f}, soft {record['loss_soft']:.4f}){val}")
            if on_epoch_end is not None:
                on_epoch_end(record)
        return self._finish(time.perf_counter() - t_start)

    def _check_stores_finite(self) -> None:
        """After a NaN loss, before blaming --lr: a store holding NaN/inf teacher values (one scan, on failure only)."""
        from softlabels.teacher.sinks import nonfinite_ids

        for store in self.task.stores:
            ids = sorted(set(nonfinite_ids(store, range(store.meta.num_units))))
            if ids:
                raise NonFiniteOutputs(
                    f"store {str(store.path)!r} holds NaN/inf teacher values for {len(ids)} sample id(s) "
                    f"({fmt.chunk_list(ids)}), so every loss is NaN; lowering --lr will not help: regenerate the store "
                    "with a fixed teacher or without those inputs")

    def _finish(self, seconds: float) -> dict[str, Any]:
        env, cfg = self.env, self.config
        digest = weights_digest(self.task.net)
        digests = env.group.all_gather(digest)
        history = ckpt_io.read_metrics(cfg.out) if env.rank == 0 else []
        summary = {"student": cfg.student, "out": str(cfg.out), "epochs": cfg.epochs, "steps": self.step,
                   "world_size": env.world, "num_parameters": self.run_config["num_parameters"], **self.task.summary(),
                   "seconds": seconds, "final": history[-1] if history else {},
                   "first_loss": history[0]["loss"] if history else None,
                   "weights_digest": digest, "weights_digest_per_rank": digests, "config": self.run_config}
        if env.rank == 0:
            ckpt_io.atomic_write_text(Path(cfg.out) / ckpt_io.SUMMARY,
                                      json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
            final = summary["final"]
            val = f", val accuracy {final['val_accuracy']:.4f}" if final.get("val_accuracy") is not None else ""
            self.log(f"done: {cfg.epochs} epochs, {self.step} steps in {seconds:.1f}s; loss "
                     f"{final.get('loss', float('nan')):.4f}{val}; wrote {cfg.out}/{ckpt_io.MODEL}")
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks finished with different weights ({digests}); this is a bug")
        env.barrier()
        return summary


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def weights_digest(model: nn.Module) -> str:
    """sha256 over the state_dict's names and tensor bytes (equal iff the weights are identical)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def store_identity(store: Any) -> dict[str, Any]:
    """What makes a store's targets the ones a run trained on, wherever the store now lies: its teacher, layout
    and a digest of its units' checksums (an ensemble has no file of its own: its attributes say enough)."""
    meta = store.meta
    sums = store.unit_checksums().astype("<u4").tobytes() if hasattr(store, "unit_checksums") else b""
    return {"teacher": meta.teacher, "layout": meta.layout, "logits_dtype": meta.logits_dtype,
            "num_samples": meta.num_samples, "num_classes": meta.num_classes, "positions": meta.positions,
            "layout_params": dict(meta.layout_params), "views": meta.views,
            "checksums_sha256": hashlib.sha256(sums).hexdigest()}


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """``{"teacher": {"spec": ..}}`` -> ``{"teacher.spec": ..}`` (one level), to name each difference."""
    return {f"{k}.{j}" if isinstance(v, dict) else k: w for k, v in d.items()
            for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}


def _check_same_stores(old: list[dict[str, Any]], new: list[dict[str, Any]], out: str) -> None:
    """--resume: the stores must be the ones the run trained on (same teacher, dtype, layout, bytes)."""
    diffs = [] if len(old) == len(new) else [f"{len(old)} store(s) in the run, {len(new)} given"]
    for i, (a, b) in enumerate(zip(map(_flat, old), map(_flat, new))):
        diffs += [f"store {i + 1}: checksums differ" if k == "checksums_sha256" else
                  f"store {i + 1}: {k} {a.get(k)!r} -> {b.get(k)!r}"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise StoreMismatch(f"--resume: the stores are not the ones the run in {str(out)!r} trained on "
                            f"({'; '.join(diffs)}); pass those stores, or --overwrite to start a new run")
