"""The student trainer: knowledge distillation from stores, or plain supervised training.

With stores, each batch of a :class:`~softlabels.student.dataset.SoftLabelDataset` (inputs
joined to teacher logits by ``sample_ids``) goes through the student and a
:class:`~softlabels.student.losses.DistillationLoss`; without stores the student learns the
hard labels of ``--data`` (how teachers and baselines are trained). Under
``torchrun`` the student is wrapped in DDP and each rank streams its share of rows;
only rank 0 writes files or prints. See :mod:`softlabels.student.checkpoint` for ``--out``.

Ranks may hold one row more or less than each other, hence one batch more or less.
Every rank therefore runs the same number of optimizer steps per epoch: a rank out
of data repeats its last batch with loss weight 0. DDP's ``Join`` would instead skip
the optimizer step on the early rank, so Adam's moments and the LR schedule would
drift apart between ranks; with equal step counts the weights stay bit-identical.
"""

from __future__ import annotations

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
from softlabels._runtime.progress import progress_bar, wants_bar
from softlabels.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelMismatch,
    NonFiniteOutputs,
)
from softlabels.inputs.arrays import class_count
from softlabels.inputs.loader import batch_loader
from softlabels.store import format as fmt
from softlabels.store.defaults import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
from softlabels.student import checkpoint as ckpt_io
from softlabels.student.config import TrainConfig
from softlabels.student.losses import DistillationLoss, make_soft_loss
from softlabels.student.trainutil import IndexBatches, lr_factor, weights_digest

__all__ = ["TrainConfig", "train", "weights_digest", "DEFAULT_TEMPERATURE", "DEFAULT_ALPHA"]

# options that must equal the checkpoint's for --resume to continue the same run
# (the stores by identity, not path: see _store_identity)
_RESUME_KEYS = ("student", "student_weights", "data", "loss", "temperature", "alpha", "batch_size",
                "lr", "optimizer", "weight_decay", "schedule", "warmup_steps", "seed", "online_teacher", "init",
                "augment")


def train(config: TrainConfig, *, teacher: nn.Module | None = None, log: Callable[[str], None] | None = None,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          student: nn.Module | None = None) -> dict[str, Any]:
    """Train the student described by ``config``; return the run summary (also in ``summary.json``).

    ``teacher``: run this module live on each batch's inputs and use its logits instead
    of the store's (online distillation; for tests and benchmarks). ``log`` receives
    progress lines (rank 0 only). ``on_epoch_end(record)`` is called on every rank after
    each epoch's checkpoint is written; an exception there stops training. ``student``:
    train this module (e.g. a pruned one, see :mod:`softlabels.evaluation.compression`) instead of
    building ``config.student``, which then only names it in the run.
    """
    if config.stores and teacher is None and student is None:
        from softlabels.student.lm_trainer import is_token_store, train_lm

        if is_token_store(config.stores[0]):  # a language model learns from per-token targets
            if config.augment:
                raise ConfigError(f"--augment draws image views, but {config.stores[0]} holds per-token targets "
                                  "of a language model; drop --augment")
            return train_lm(config, log=log, on_epoch_end=on_epoch_end)
    if config.token_data and teacher is None and student is None:  # a language model on hard next-token CE
        from softlabels.student.lm_trainer import train_lm

        return train_lm(config, log=log, on_epoch_end=on_epoch_end)
    problems = config.problems(online=teacher is not None)
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
            run = _Run(config, env, teacher, log if env.rank == 0 else None, student)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
        env.group.agree(error)  # one rank's setup error stops all ranks, none waits forever
        try:
            run.connect()
            return run.fit(on_epoch_end)
        finally:
            run.close()
    finally:
        lock.release()
        env.stop()


class _Run:
    """One training run, set up from a config: data, student, loss, optimizer, out dir."""

    def __init__(self, config: TrainConfig, env: DistEnv, teacher: nn.Module | None, log,
                 student: nn.Module | None = None) -> None:
        from softlabels.inputs.spec import resolve_data
        from softlabels.store.reader import open_store
        from softlabels.teacher.spec import resolve_model

        self.config, self.env, self.log = config, env, log or (lambda _msg: None)
        # rank 0: a bar on a terminal (or with progress=True); in a log, a line every LINE_EVERY_S s and per epoch
        self.bar_shown = env.rank == 0 and wants_bar(config.progress)
        self.lines_shown = env.rank == 0 and not self.bar_shown and config.progress is None
        self.resume_from = ckpt_io.check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite)
        self.stores: list = []
        self.sl = None
        self.augment = None  # a views store's augmentation, replayed on the device from each batch's view_params
        # -- data ------------------------------------------------------------------------
        if config.stores or config.ensemble:
            self.stores = [open_store(p) for p in config.stores] or [_ensemble(config)]
            specs = list(config.data) or [self._recorded_spec(s) for s in self.stores]
            datasets = [resolve_data(s) for s in specs]
            from softlabels.student.dataset import SoftLabelDataset

            self.sl = SoftLabelDataset(list(zip(self.stores, datasets)), batch_size=config.batch_size, shuffle=True,
                                       seed=config.seed, views_per_sample=config.views_per_sample)
            num_classes, layout = int(self.sl.num_classes), self.sl.layout
            batches: Any = self.sl
        else:
            specs = list(config.data)
            datasets = [resolve_data(s) for s in specs]
            if teacher is None and not any(d.has_labels for d in datasets):
                raise DataError(f"{', '.join(specs)} has no labels; train on labeled data, or distil from a store")
            counts = [c for c in map(class_count, datasets) if c is not None]
            if not counts:
                raise DataError(f"cannot tell the class count of {', '.join(specs)}; give it labels")
            num_classes, layout = max(counts), None
            batches = self.index_batches = IndexBatches(
                datasets, labeled_only=teacher is None, batch_size=config.batch_size, seed=config.seed,
                rank=env.rank, world=env.world)
        shapes = {tuple(d.input_shape) for d in datasets}
        if len(shapes) > 1:
            raise DataError(f"the inputs differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                            "train on data of one kind")
        self.input_shape, self.num_classes = shapes.pop(), num_classes
        if self.sl is not None and self.sl.augment is not None:
            from softlabels.student.replay import replay_op

            self.augment, self.input_shape = replay_op(self.sl, self.input_shape)
        self.fresh_views = None  # --augment: the un-augmented input shape, from which each epoch's views are drawn
        if config.augment:
            self.augment, self.fresh_views = self._fresh_augment(config.augment), self.input_shape
            from softlabels.inputs.augment import view_shape

            self.input_shape = view_shape(self.augment, self.input_shape)
        self.loader = batch_loader(batches, num_workers=config.num_workers, pin_memory=env.device.type == "cuda")
        self.val = resolve_data(config.val_data) if config.val_data else None
        if self.val is not None and tuple(self.val.input_shape) != self.input_shape:
            raise DataError(f"--val-data {config.val_data!r} has inputs of shape {tuple(self.val.input_shape)}, "
                            f"the training data {self.input_shape}; validate on data of the same kind")
        # -- loss --------------------------------------------------------------------------
        self.teacher = None if teacher is None else teacher.to(env.device).eval()
        distil = bool(config.stores or config.ensemble) or teacher is not None
        temperature = DEFAULT_TEMPERATURE if config.temperature is None else config.temperature
        alpha = DEFAULT_ALPHA if config.alpha is None else config.alpha
        loss_name = None
        if distil:
            from softlabels.student.replay import check_loss

            layout = "dense" if teacher is not None else layout
            loss_name = check_loss(config.loss, layout, ", ".join(config.stores or config.ensemble))
        self.loss_fn = DistillationLoss(make_soft_loss(loss_name, temperature) if distil else None, alpha)
        for line in self._without_effect(distil, loss_name, alpha):
            self.log(f"warning: {line}")
        # -- student -----------------------------------------------------------------------
        torch.manual_seed(config.seed)
        # -- fine-tuning (--init RUN) or a caller's module (compress) ---------------------------
        from softlabels.student.runs import run_weights
        from softlabels.teacher.spec import ModelInfo

        init = run_weights(config.init) if config.init else config.student_weights
        if student is not None:
            info = ModelInfo(student, config.student, "module", None, sum(p.numel() for p in student.parameters()))
        else:
            info = resolve_model(config.student, input_shape=self.input_shape, num_classes=num_classes, weights=init,
                                 allow_pickle=config.allow_pickle and not config.init)
        if config.init:
            self.log(f"starting from the weights of {init} (sha256 {info.weights_sha256[:12]}); new optimizer")
        if info.kind == "export":
            raise ConfigError(f"{config.student!r} is a torch.export program, which cannot be trained; pass the "
                              "architecture (built-in name, module:factory or TorchScript) and --student-weights")
        self.student = info.module
        self._check_width(config.student, num_classes)
        self.student.to(env.device).train()
        params = self.student.parameters()
        if config.optimizer == "adamw":
            self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        self.local_steps = len(batches)
        self.run_config = {
            **{k: v for k, v in asdict(config).items() if k not in ("resume", "overwrite", "progress", "allow_pickle")},
            "stores": [str(Path(p).resolve()) for p in config.stores], "data": specs,
            "loss": loss_name, "temperature": temperature if distil else None, "alpha": alpha if distil else None,
            "input_shape": list(self.input_shape), "num_classes": num_classes, "layout": layout,
            "online_teacher": teacher is not None, "world_size": env.world,
            "student_kind": info.kind, "student_weights_sha256": info.weights_sha256,
            "num_parameters": info.num_parameters,
            "teachers": [{"store": str(Path(s.path).resolve()), "layout": s.meta.layout,
                          "num_samples": s.meta.num_samples, "num_classes": s.meta.num_classes,
                          "logits_dtype": s.meta.logits_dtype, "teacher": s.meta.teacher,
                          "source": s.meta.source} for s in self.stores],
            "store_identity": [_store_identity(s) for s in self.stores],
        }
        self.state = None
        if self.resume_from is not None:
            self.state = ckpt_io.load_checkpoint(self.resume_from)
            old = self.state["config"]
            keys = _RESUME_KEYS if "store_identity" in old else ("stores", *_RESUME_KEYS)  # older runs: paths
            diffs = [f"{k}: {old.get(k)!r} -> {self.run_config[k]!r}" for k in keys
                     if old.get(k) != self.run_config[k]]
            if old.get("views_per_sample", 1) != config.views_per_sample:  # runs before the option used 1
                diffs.append(f"views_per_sample: {old.get('views_per_sample', 1)!r} -> {config.views_per_sample!r}")
            if "store_identity" in old:
                _check_same_stores(old["store_identity"], self.run_config["store_identity"], config.out)
            if diffs:
                raise ConfigError(f"--resume with other settings than {self.resume_from} ({'; '.join(diffs)}); "
                                  "rerun with the original options, or pass --overwrite to start over")

    def connect(self) -> None:
        """The collective part of the setup: step count, DDP, schedule, resumed state."""
        config, env = self.config, self.env
        local = torch.tensor([self.local_steps, -self.local_steps], dtype=torch.int64)
        hi, neg_lo = env.all_reduce(local, dist.ReduceOp.MAX).tolist()
        if -neg_lo < 1:
            raise DataError(f"a rank got no rows to train on; use fewer processes than the {config.batch_size}"
                            "-row batches the data holds")
        self.steps_per_epoch = self.run_config["steps_per_epoch"] = hi
        self.model = self.student
        if env.world > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_factor(config.schedule, config.warmup_steps, config.epochs * hi))
        self.start_epoch, self.step = 0, 0
        if env.rank == 0:  # only now that every rank's setup succeeded: an earlier run is replaced
            ckpt_io.start_out_dir(config.out, keep=self.state is not None)
        if self.state is not None:
            self._restore(self.state)
        elif config.resume:
            self.log(f"--resume: no checkpoint in {config.out}; starting a new run")

    def _without_effect(self, distil: bool, loss: str | None, alpha: float) -> list[str]:
        """The options given that change nothing in this run, each with what to do instead."""
        cfg, notes = self.config, []
        if cfg.allow_pickle and cfg.student_weights is None:
            notes.append("--allow-pickle has no effect without --student-weights; drop it")
        if not distil:
            return notes
        if alpha == 1 and (cfg.loss is not None or cfg.temperature is not None):
            notes.append("--alpha 1 leaves only the hard-label loss, so --loss and --temperature have no effect "
                         "and the teacher's logits are not used; lower --alpha to distil")
        if loss == "mse" and cfg.temperature is not None:
            notes.append("--temperature has no effect with --loss mse, which matches raw logits; drop it")
        if alpha > 0 and self.stores and all(hasattr(s, "labels") for s in self.stores) \
                and not any((s.labels >= 0).any() for s in self.stores):
            given = "" if cfg.alpha is not None else " (the default)"
            notes.append(f"the stores hold no labels, so --alpha {alpha}{given} only scales the soft loss by "
                         f"{1 - alpha:g} (the hard-label term is 0 on unlabeled rows); pass --alpha 0, or add a "
                         "labeled store")
        return notes

    def _fresh_augment(self, spec: str):
        """``--augment``'s op; refused on a views store, which replays the views its teacher saw."""
        from softlabels.inputs.augment import parse_augment

        if self.sl is not None and self.sl.augment is not None:
            path = self.stores[0].path
            raise ConfigError(f"--augment draws new views, but {path} is a views store that replays its own "
                              f"('{self.sl.augment}') with the teacher's output for each; drop --augment")
        return parse_augment(spec)

    def _view_params(self, batch: dict[str, Any]) -> torch.Tensor:
        """This batch's view parameters: stored (a views store), or drawn from (seed, sample id, epoch)."""
        if self.fresh_views is None:
            return batch["view_params"]
        from softlabels.inputs.augment import draw_views

        ids = batch["sample_ids"]
        if len(self.stores) > 1:  # several stores may reuse sample ids: the source tells them apart
            ids = ids + (batch["source"].to(ids.device) << 48)
        epoch = torch.full_like(ids, self.epoch)
        return draw_views(self.augment, self.config.seed, ids, epoch, self.fresh_views)

    def _recorded_spec(self, store) -> str:
        from softlabels.teacher.spec import recorded_spec

        spec = store.meta.source.get("spec")
        if not spec:
            raise ConfigError(f"store {str(store.path)!r} does not record its data spec; pass --data for it")
        recorded_spec(spec, kind="data", where=f"store {str(store.path)!r}", flag="--data")
        self.log(f"inputs for {store.path}: {spec} (the store's recorded source.spec)")
        return spec

    def _check_width(self, spec: str, num_classes: int) -> None:
        with torch.no_grad():
            out = self.student.eval()(torch.zeros((1, *self.input_shape)))
        width = out.shape[-1] if out.ndim == 2 else tuple(out.shape[1:])
        if width != num_classes:
            what = f"store {', '.join(self.config.stores)} has" if self.config.stores else "the data has"
            raise ModelMismatch(f"student {spec!r} outputs {width} classes per sample but {what} {num_classes}; "
                                f"use a student with {num_classes} outputs (built-in models size themselves)")

    def _restore(self, state: dict[str, Any]) -> None:
        old = state["config"]
        if old.get("world_size") != self.env.world:
            self.log(f"note: resuming a {old.get('world_size')}-process run on {self.env.world} processes; "
                     "the data split per rank changes")
        try:  # well-formed fields (checked on load) that still do not fit this student
            self.student.load_state_dict(state["model"])
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

    def _check_stores_finite(self) -> None:
        """After a NaN loss, before blaming --lr: a store holding NaN/inf teacher values (one scan, on failure only)."""
        for store in self.stores:
            ids = _v2_nonfinite(store)
            if ids:
                raise NonFiniteOutputs(
                    f"store {str(store.path)!r} holds NaN/inf teacher values for {len(ids)} sample id(s) "
                    f"({fmt.chunk_list(ids)}), so every loss is NaN; lowering --lr will not help: regenerate the store "
                    "with a fixed teacher or without those inputs")

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        from softlabels.store.layouts import DenseTarget
        from softlabels.student.losses import as_target

        batch = {k: v.to(self.env.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        if self.config.views_per_sample > 1:  # k views of each input read: B·k rows, the input copied on the device
            from softlabels.student.replay import spread_views

            batch = spread_views(batch, self.config.views_per_sample, self.sl.layout_obj)
        if self.augment is not None:  # the stored view rebuilt from its parameters, or a fresh one (docs/VIEWS.md)
            batch["x"] = self.augment.apply(batch["x"], self._view_params(batch))
        if self.teacher is not None:
            with torch.no_grad():
                batch["target"] = DenseTarget(self.teacher(batch["x"]).float())
        elif self.stores:
            batch["target"] = as_target(batch)
        return batch

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, env = self.config, self.env
        (self.sl if self.sl is not None else self.index_batches).set_epoch(epoch)  # len() may be 0
        self.epoch = epoch
        sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, hard, soft (row-weighted), rows
        bar = progress_bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batches",
                       show=self.bar_shown, say=self.log if self.lines_shown else (lambda _line: None), leave=False)
        every = max(1, self.steps_per_epoch // 50)
        t0 = time.perf_counter()
        it, last = iter(self.loader), None
        for i in range(self.steps_per_epoch):
            _signals.check()  # a stop signal whose KeyboardInterrupt was swallowed
            batch = next(it, None)
            weight = 1.0
            if batch is None:  # this rank is out of rows: a zero-weight step keeps the ranks in lockstep
                batch, weight = last, 0.0
            else:
                batch = last = self._to_device(batch)
            loss = self.loss_fn(self.model(batch["x"]), batch)
            self.opt.zero_grad(set_to_none=True)
            (loss * weight if weight != 1.0 else loss).backward()
            self.opt.step()
            self.sched.step()
            self.step += 1
            rows = weight * len(batch["labels"]) / cfg.views_per_sample  # samples: k views of one count once
            parts = self.loss_fn.last_parts
            sums += torch.stack([loss.detach(), parts["hard"], parts["soft"], loss.new_ones(())]).double() * rows
            if (i + 1) % every == 0 and (self.bar_shown or self.lines_shown):
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / max(s[3], 1):.4f}",
                                samples_s=f"{s[3] * env.world / (time.perf_counter() - t0):.0f}")
            bar.update()
        bar.close()
        for _ in it:  # never expected: the dataset yielded more batches than len() said
            raise DataError("the soft-label dataset yielded more batches than it announced; this is a bug")
        total = env.all_reduce(sums.cpu()).tolist()
        seconds = time.perf_counter() - t0
        rows = max(total[3], 1)
        return {"epoch": epoch + 1, "step": self.step, "loss": total[0] / rows, "loss_hard": total[1] / rows,
                "loss_soft": total[2] / rows, "lr": self.sched.get_last_lr()[0], "samples": int(total[3]),
                "epoch_seconds": seconds, "samples_per_s": total[3] / seconds}

    def _save(self, epoch_done: int) -> None:
        ckpt_io.save_run(self.config.out, self.student, self.opt, self.sched, epoch=epoch_done, step=self.step,
                         config=self.run_config)

    def fit(self, on_epoch_end) -> dict[str, Any]:
        from softlabels.student.metrics import evaluate_model

        cfg, env = self.config, self.env
        t_start = time.perf_counter()
        what = f"from {len(self.stores)} store(s), loss {self.run_config['loss']}" if self.stores else "on hard labels"
        self.log(f"training {cfg.student} ({self.run_config['num_parameters']:,} parameters) {what}, "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {env.world} x {env.device}")
        record: dict[str, Any] = {}
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self._epoch(epoch)
            if not math.isfinite(record["loss"]):  # same on every rank (all-reduced): all stop together
                kept = f" (the checkpoint after epoch {epoch} is kept)" if epoch else ""
                self._check_stores_finite()
                raise NonFiniteOutputs(f"training diverged: loss {record['loss']} in epoch {epoch + 1}; "
                                       f"lower --lr{kept}")
            if self.val is not None and env.rank == 0:
                t0 = time.perf_counter()
                m = evaluate_model(self.student, self.val, num_classes=self.num_classes,
                                   batch_size=max(cfg.batch_size, 256), device=env.device)
                record.update(val_accuracy=m["accuracy"], val_ece=m["ece"], val_n=m["n"],
                              val_seconds=time.perf_counter() - t0)
            if env.rank == 0:
                ckpt_io.append_metrics(cfg.out, record)  # before the checkpoint: a resume rewrites it
                self._save(epoch + 1)
                val = f", val acc {record['val_accuracy']:.4f}" if record.get("val_accuracy") is not None else ""
                if not self.bar_shown:  # the bar shows progress otherwise
                    self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}{val}")
            if on_epoch_end is not None:
                on_epoch_end(record)
        return self._finish(time.perf_counter() - t_start)

    def _finish(self, seconds: float) -> dict[str, Any]:
        from softlabels.teacher.models import count_flops

        env, cfg = self.env, self.config
        digest = weights_digest(self.student)
        digests = [digest]
        if env.world > 1:
            digests = [None] * env.world
            dist.all_gather_object(digests, digest)
        history = ckpt_io.read_metrics(cfg.out) if env.rank == 0 else []
        summary = {
            "student": cfg.student, "out": str(cfg.out), "epochs": cfg.epochs, "steps": self.step,
            "world_size": env.world, "num_parameters": self.run_config["num_parameters"],
            "flops": count_flops(self.student, self.input_shape), "seconds": seconds,
            "final": history[-1] if history else {}, "first_loss": history[0]["loss"] if history else None,
            "weights_digest": digest, "weights_digest_per_rank": digests,
            "config": self.run_config,
        }
        if env.rank == 0:
            ckpt_io.atomic_write_text(Path(cfg.out) / ckpt_io.SUMMARY, _json(summary))
            final = summary["final"]
            val = f", val accuracy {final['val_accuracy']:.4f}" if final.get("val_accuracy") is not None else ""
            self.log(f"done: {cfg.epochs} epochs, {self.step} steps in {seconds:.1f}s; loss "
                     f"{final.get('loss', float('nan')):.4f}{val}; wrote {cfg.out}/{ckpt_io.MODEL}")
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks finished with different weights ({digests}); this is a bug")
        env.barrier()
        return summary

    def close(self) -> None:
        for s in self.stores:
            s.close()


def _ensemble(config: TrainConfig):
    """The --ensemble stores as one store source, combined at the training temperature (exact there)."""
    from softlabels.store.ensemble import EnsembleStore

    t = DEFAULT_TEMPERATURE if config.temperature is None else config.temperature
    return EnsembleStore(config.ensemble, mode=config.ensemble_mode, weights=config.ensemble_weights, temperature=t)


def _store_identity(store) -> dict[str, Any]:
    """What makes a store's targets the ones a run trained on, wherever the store now lies."""
    import hashlib

    from softlabels.store import format as fmt

    if not hasattr(store, "chunk_done"):  # format 2 (or an ensemble of such stores)
        from softlabels.student.replay import v2_identity

        return v2_identity(store)
    checksums = store._whole(fmt.CHECKSUMS).astype("<u4").tobytes()
    return {"teacher": store.teacher, "layout": store.layout, "logits_dtype": store.logits_dtype,
            "num_samples": store.num_samples, "num_classes": store.num_classes, "topk": store.meta.topk,
            "checksums_sha256": hashlib.sha256(checksums).hexdigest()}


def _v2_nonfinite(store) -> list[int]:
    """Sample ids whose stored teacher values hold NaN/inf, in a format-2 store source."""
    from softlabels.store import format as fmt

    layout, ids = store.meta.layout_obj(), []
    for u in range(store.meta.num_units):
        block = store.read_unit(u, verify=False)
        ids += block[fmt.SAMPLE_IDS][layout.nonfinite_rows(block)].tolist()
    return sorted(ids)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """``{"teacher": {"spec": ..}}`` -> ``{"teacher.spec": ..}`` (one level), to name each difference."""
    return {f"{k}.{j}" if isinstance(v, dict) else k: w for k, v in d.items()
            for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}


def _check_same_stores(old: list[dict[str, Any]], new: list[dict[str, Any]], out: str) -> None:
    """--resume: the stores must be the ones the run trained on (same teacher, dtype, layout, bytes)."""
    from softlabels.errors import StoreMismatch

    diffs = [] if len(old) == len(new) else [f"{len(old)} store(s) in the run, {len(new)} given"]
    for i, (a, b) in enumerate(zip(old, new)):
        flat_a, flat_b = _flat(a), _flat(b)
        for key in sorted(set(flat_a) | set(flat_b)):
            x, y = flat_a.get(key), flat_b.get(key)
            if x != y:
                diffs.append(f"store {i + 1}: " + ("checksums differ" if key == "checksums_sha256" else
                                                    f"{key} {x!r} -> {y!r}"))
    if diffs:
        raise StoreMismatch(f"--resume: the stores are not the ones the run in {str(out)!r} trained on "
                            f"({'; '.join(diffs)}); pass those stores, or --overwrite to start a new run")


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
