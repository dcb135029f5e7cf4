"""The classifier task of the trainer: ``sample``/``views`` stores, or the hard labels of ``--data``.

With stores, each batch of a :class:`~softlabels.student.dataset.SoftLabelDataset` goes through
the student and a :class:`~softlabels.student.losses.DistillationLoss`; without, the student
learns the hard labels of ``--data`` (teachers and baselines) or a live ``teacher``'s logits;
:func:`check_loss` refuses a loss that does not fit the layout's targets. A views store's inputs
are augmented on the device with each batch's ``view_params`` by its recorded augmentation,
rebuilt from built-in ops only (:func:`replay_op`: code a store names is never imported);
``--augment`` draws a fresh view per sample and epoch instead.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from softlabels.errors import ConfigError, DataError, ModelMismatch
from softlabels.inputs.arrays import all_labels, class_count
from softlabels.student.config import TrainConfig
from softlabels.student.kinds.sample import join_rows
from softlabels.student.losses import DistillationLoss, as_target, make_soft_loss
from softlabels.student.trainutil import Task, distillation_settings

__all__ = ["Classifier", "check_loss", "replay_op", "valid_losses"]


class Classifier(Task):
    """Data, student and loss of a classifier run (what :class:`~softlabels.student.trainer` asks of a task)."""

    unit = "samples"  # what the metrics count
    # runs from before --views-per-sample trained on one view
    resume_keys = {"online_teacher": None, "augment": None, "views_per_sample": 1}

    def __init__(self, config: TrainConfig, env: Any, log, *, teacher: nn.Module | None = None,
                 student: nn.Module | None = None) -> None:
        from softlabels.inputs.spec import resolve_data
        from softlabels.store.reader import open_store
        from softlabels.student.dataset import DataBatches, SoftLabelDataset

        self.config, self.env, self.log, self.epoch = config, env, log, 0
        self.stores: list = []
        self.sl = None
        self.augment = None  # a views store's augmentation, replayed on the device from each batch's view_params
        try:
            if config.stores or config.ensemble:
                self.stores = [open_store(p) for p in config.stores] or [_ensemble(config)]
                specs = list(config.data) or [self._recorded_spec(s) for s in self.stores]
                datasets = [resolve_data(s) for s in specs]
                self.sl = SoftLabelDataset(list(zip(self.stores, datasets)), batch_size=config.batch_size,
                                           shuffle=True, seed=config.seed, views_per_sample=config.views_per_sample)
                num_classes, layout = self.sl.num_classes, self.sl.layout
                self.batches: Any = self.sl
            else:
                specs = list(config.data)
                datasets = [resolve_data(s) for s in specs]
                if teacher is None and not any(d.has_labels for d in datasets):
                    raise DataError(f"{', '.join(specs)} has no labels; train on labeled data, or distil from a store")
                counts = [c for c in map(class_count, datasets) if c is not None]
                if not counts:
                    raise DataError(f"cannot tell the class count of {', '.join(specs)}; give it labels")
                num_classes, layout = max(counts), None
                offsets = np.cumsum([0] + [len(d) for d in datasets])
                ids = np.arange(offsets[-1], dtype=np.int64)
                if teacher is None:  # hard labels: the labeled rows only
                    ids = ids[np.concatenate([all_labels(d) for d in datasets]) >= 0]
                self.batches = DataBatches(ids, partial(_data_batch, datasets, offsets),
                                           share="rows", batch_size=config.batch_size,
                                           seed=config.seed, rank=env.rank, world=env.world)
            shapes = {tuple(d.input_shape) for d in datasets}
            if len(shapes) > 1:
                raise DataError(f"the inputs differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                                "train on data of one kind")
            self.input_shape, self.num_classes = shapes.pop(), num_classes
            if self.sl is not None and self.sl.augment is not None:
                self.augment, self.input_shape = replay_op(self.sl, self.input_shape)
            self.fresh_views = None  # --augment: the un-augmented input shape, from which each epoch's views are drawn
            if config.augment:
                from softlabels.inputs.augment import parse_augment, view_shape

                if self.sl is not None and self.sl.augment is not None:
                    raise ConfigError(f"--augment draws new views, but {self.stores[0].path} is "
                                      "a views store that replays its own "
                                      f"('{self.sl.augment}') with the teacher's output for each; "
                                      "drop --augment")
                self.augment, self.fresh_views = parse_augment(config.augment), self.input_shape
                self.input_shape = view_shape(self.augment, self.input_shape)
            self.val = resolve_data(config.val_data) if config.val_data else None
            if self.val is not None and tuple(self.val.input_shape) != self.input_shape:
                raise DataError(f"--val-data {config.val_data!r} has inputs of shape {tuple(self.val.input_shape)}, "
                                f"the training data {self.input_shape}; validate on data of the same kind")
            self.teacher = None if teacher is None else teacher.to(env.device).eval()
            distil = bool(config.stores or config.ensemble) or teacher is not None
            temperature, alpha = distillation_settings(config.temperature, config.alpha, self.stores, log) \
                if distil else (None, 0.0)
            loss_name = None
            if distil:
                layout = "dense" if teacher is not None else layout
                loss_name = check_loss(config.loss, layout, ", ".join(config.stores or config.ensemble))
            self.loss_fn = DistillationLoss(make_soft_loss(loss_name, temperature) if distil else None, alpha)
            if loss_name not in (None, "mse") and alpha < 1:  # a merged arithmetic store is exact at its T only
                from softlabels.store.ensemble import check_temperature

                for s in self.stores:
                    check_temperature(s.meta, temperature, str(s.path))
            for line in self._without_effect(distil, loss_name, alpha):
                log(f"warning: {line}")
            self.info = self._student(student)
        except BaseException:
            self.close()
            raise
        self.student = self.net = self.info.module
        self.run_config = {
            "data": specs, "loss": loss_name, "temperature": temperature if distil else None,
            "alpha": alpha if distil else None, "input_shape": list(self.input_shape), "num_classes": num_classes,
            "layout": layout, "online_teacher": teacher is not None}

    def _student(self, student: nn.Module | None):
        """The student (seeded from --seed; --init or --student-weights, or a caller's module), checked."""
        from softlabels.student.checkpoint import run_weights
        from softlabels.teacher.models import count_parameters
        from softlabels.teacher.spec import ModelInfo, resolve_model

        config = self.config
        torch.manual_seed(config.seed)
        init = run_weights(config.init) if config.init else config.student_weights
        if student is not None:
            info = ModelInfo(student, config.student, "module", None, count_parameters(student))
        else:
            info = resolve_model(config.student, input_shape=self.input_shape, num_classes=self.num_classes,
                                 weights=init, allow_pickle=config.allow_pickle and not config.init)
        if info.kind == "export":
            raise ConfigError(f"{config.student!r} is a torch.export program, which cannot be trained; pass the "
                              "architecture (built-in name, module:factory or TorchScript) and --student-weights")
        with torch.no_grad():
            out = info.module.eval()(torch.zeros((1, *self.input_shape)))
        width = out.shape[-1] if out.ndim == 2 else tuple(out.shape[1:])
        if width != self.num_classes:
            what = f"store {', '.join(config.stores)} has" if config.stores else "the data has"
            raise ModelMismatch(f"student {config.student!r} outputs {width} classes per sample but {what} "
                                f"{self.num_classes}; use a student with {self.num_classes} outputs (built-in models "
                                "size themselves)")
        info.module.to(self.env.device).train()
        return info

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
        labels = [_labels(s) for s in self.stores]
        if alpha > 0 and labels and all(x is not None and not (x >= 0).any() for x in labels):
            given = "" if cfg.alpha is not None else " (the default)"
            notes.append(f"the stores hold no labels, so --alpha {alpha}{given} only scales the soft loss by "
                         f"{1 - alpha:g} (the hard-label term is 0 on unlabeled rows); pass --alpha 0, or add a "
                         "labeled store")
        return notes

    def _recorded_spec(self, store) -> str:
        from softlabels.teacher.spec import recorded_spec

        spec = store.meta.source.get("spec")
        if not spec:
            raise ConfigError(f"store {str(store.path)!r} does not record its data spec; pass --data for it")
        recorded_spec(spec, kind="data", where=f"store {str(store.path)!r}", flag="--data")
        self.log(f"inputs for {store.path}: {spec} (the store's recorded source.spec)")
        return spec

    # -- what the trainer asks per batch (a rank out of rows gets no batch at all) ---------------------------
    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        from softlabels.store.layouts import DenseTarget

        batch = super().to_device(batch)
        if self.config.views_per_sample > 1:  # k views of each input read: B·k rows, the input copied on the device
            from softlabels.student.kinds.sample import spread_views

            batch = spread_views(batch, self.config.views_per_sample, self.sl.layout_obj)
        if self.augment is not None:  # the stored view rebuilt from its parameters, or a fresh one (docs/VIEWS.md)
            batch["x"] = self.augment.apply(batch["x"], self._view_params(batch))
        if self.teacher is not None:
            with torch.no_grad():
                batch["target"] = DenseTarget(self.teacher(batch["x"]).float())
        elif self.stores:
            batch["target"] = as_target(batch)
        return batch

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

    def loss(self, model: nn.Module, batch: dict[str, Any], weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss to back-propagate, and its row-weighted (loss, hard, soft, rows) for the metrics."""
        loss = self.loss_fn(model(batch["x"]), batch)
        rows = weight * len(batch["labels"]) / self.config.views_per_sample  # samples: k views of one count once
        parts = self.loss_fn.last_parts
        sums = torch.stack([loss.detach(), parts["hard"], parts["soft"], loss.new_ones(())]).double() * rows
        return (loss * weight if weight != 1.0 else loss), sums

    def validate(self, record: dict[str, Any]) -> None:
        """Add --val-data's accuracy and ECE to an epoch's record (rank 0)."""
        if self.val is None:
            return
        from softlabels.student.metrics import evaluate_model

        t0 = time.perf_counter()
        m = evaluate_model(self.student, self.val, num_classes=self.num_classes,
                           batch_size=max(self.config.batch_size, 256), device=self.env.device)
        record.update(val_accuracy=m["accuracy"], val_ece=m["ece"], val_n=m["n"], val_seconds=time.perf_counter() - t0)

    def describe(self) -> str:
        return f"from {len(self.stores)} store(s), loss {self.run_config['loss']}" if self.stores else "on hard labels"

    def summary(self) -> dict[str, Any]:
        from softlabels.teacher.models import count_flops

        return {"flops": count_flops(self.student, self.input_shape)}


def _data_batch(datasets: list, offsets: np.ndarray, ids: np.ndarray) -> dict[str, torch.Tensor]:
    """The batch of rows ``ids`` of ``datasets`` (numbered on from one to the next)."""
    if len(datasets) == 1:
        x, y = datasets[0].get_batch(ids)
    else:
        which = np.searchsorted(offsets, ids, side="right") - 1
        x, y = join_rows(len(ids), [(m, datasets[j].get_batch(ids[m] - offsets[j]))
                                    for j in range(len(datasets)) if (m := which == j).any()])
    return {"x": x, "labels": y, "sample_ids": torch.from_numpy(ids.copy())}


def _ensemble(config: TrainConfig):
    """The --ensemble stores as one store source, combined at the training temperature (exact there)."""
    from softlabels.store.ensemble import EnsembleStore

    t = config.temperature
    if t is None:  # the members' default, which the ensemble then answers exactly
        from softlabels.store.defaults import default_temperature
        from softlabels.store.reader import open_store

        with open_store(config.ensemble[0]) as first:
            m = first.meta
            t = default_temperature(m.layout, m.positions, m.temperatures())
    return EnsembleStore(config.ensemble, mode=config.ensemble_mode, weights=config.ensemble_weights, temperature=t)


def _labels(store: Any):
    """A store's labels (None for an ensemble, which has no file of its own)."""
    handle = getattr(store, "_handle", None)
    return None if handle is None else handle().read("labels", 0, store.meta.num_samples)


_DENSE_ONLY = ("kl", "soft_ce", "mse")


def valid_losses(layout: str) -> list[str]:
    """The losses taking ``layout``'s targets: its forward KL (the default) and the divergences."""
    from softlabels.store.layouts import LAYOUTS
    from softlabels.student.losses import LOSSES, _Divergence

    divergences = [n for n, cls in LOSSES.items() if issubclass(cls, _Divergence)]
    own = list(_DENSE_ONLY) if layout == "dense" else [LAYOUTS[layout].default_loss]
    return own + divergences


def check_loss(loss: str | None, layout: str, where: str) -> str:
    """``loss`` (default: the layout's ``default_loss``) if it fits ``layout``; else one line."""
    from softlabels.store.layouts import LAYOUTS

    name = loss or LAYOUTS[layout].default_loss
    if name in valid_losses(layout):
        return name
    if layout == "topk" and name in _DENSE_ONLY:
        raise ConfigError(f"loss {name!r} needs dense teacher logits but {where} holds top-k "
                          "logits; use --loss topk_kl")
    if layout == "dense" and name == "topk_kl":
        raise ConfigError(f"loss 'topk_kl' is for top-k stores but {where or 'the teacher'} gives "
                          "dense logits; use --loss kl, soft_ce or mse")
    from softlabels.student.losses import LOSSES

    if name not in LOSSES:
        return name  # make_soft_loss names the choices
    raise ConfigError(f"loss {name!r} does not take the {layout} targets of "
                      f"{where or 'the teacher'}; use --loss {' or '.join(valid_losses(layout))}")


def replay_op(dataset: Any, input_shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """A views dataset's augmentation op (or None for an empty spec) and the shape of one view."""
    from softlabels.errors import CorruptStore
    from softlabels.inputs.augment import parse_augment, view_shape
    from softlabels.store.positions.views import refuse_code_terms

    spec = dataset.augment
    if not spec:
        return None, input_shape
    path = dataset.stores[0].path
    refuse_code_terms(path, spec, "training replays built-in ops only; generate the views with built-in "
                      "ops (docs/VIEWS.md)")
    aug = parse_augment(spec)
    params = dataset.kind.params
    if aug.num_params != params:
        raise CorruptStore(f"{path} holds {params} view parameters per view but its augmentation "
                           f"'{spec}' takes {aug.num_params}; regenerate the store")
    return aug, view_shape(aug, input_shape)
