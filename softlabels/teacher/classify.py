"""The classifier-teacher producer: ``sample`` and ``views`` stores, any layout.

:func:`classify_producer` resolves a ``generate`` job's data and teacher and runs the teacher on
a first tiny batch, so a model that does not fit its inputs fails before any store exists;
:class:`ClassifyProducer` turns each span into the layout's arrays (views: docs/VIEWS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels._runtime.distributed import Dist
from softlabels.errors import ConfigError, DataError, ModelMismatch, SoftLabelsError, one_line
from softlabels.inputs.arrays import class_count
from softlabels.inputs.fingerprints import fingerprint
from softlabels.inputs.loader import batch_loader
from softlabels.inputs.augment import Compose, draw_views, param_dtype, parse_augment, refuse_random_data, view_shape
from softlabels.inputs.spec import absolute_data_spec, resolve_data
from softlabels.store import format as fmt
from softlabels.store.layouts import Layout, make_layout, to_numpy
from softlabels.store.positions import group_units_for
from softlabels.store.positions.views import VIEW_PARAMS
from softlabels.store.reader import UnitStore
from softlabels.store.schema import StoreMetaV2
from softlabels.teacher.config import GenerateConfig
from softlabels.teacher.models import BUILTIN_MODELS
from softlabels.teacher.producer import autocast
from softlabels.teacher.spec import resolve_model, teacher_classes

__all__ = ["DEFAULT_VIEW_TOPK", "ClassifyProducer", "Teacher", "ViewPlan", "classify_producer",
           "view_plan"]

DEFAULT_VIEW_TOPK = 5
"""K of the default layout for views (top-k): docs/VIEWS.md, "Generating views"."""


@dataclass(frozen=True)
class ViewPlan:
    """How the views of a store are made: the op, V, the seed, and stored params to reuse (or None)."""

    aug: Compose
    count: int
    seed: int
    param_dtype: str  # the storage dtype of view_params (softlabels.inputs.augment.param_dtype)
    params: np.ndarray | None = None  # [N, V, P] float32 from --views-from

    def attrs(self) -> dict[str, Any]:
        """The ``views`` root attribute (``ViewPositions.to_attrs``' fields)."""
        names = [f"{op.spec.split('(')[0]}.{j}" for op in self.aug.ops for j in range(int(op.num_params))]
        return {"count": self.count, "augment": self.aug.spec, "seed": self.seed, "param_names": names,
                "param_dtype": self.param_dtype}


def view_plan(*, views: int | None, augment: str | None, views_from: str | None, seed: int, num_samples: int,
              fingerprint: str | None, input_shape: tuple[int, ...], data: str) -> ViewPlan | None:
    """Resolve ``--views``/``--augment``/``--views-from`` (None for a ``sample`` store)."""
    if views_from is None:
        if views is None:
            return None
        aug = parse_augment(augment)  # a package.module:factory term named on the command line is imported
        view_shape(aug, input_shape)
        return ViewPlan(aug, views, seed, param_dtype(aug, tuple(input_shape[1:])))
    try:
        other = UnitStore(views_from)
    except SoftLabelsError as err:
        raise DataError(f"--views-from '{views_from}' is no complete format-2 views store ({err}); pass a store "
                        "written by 'softlabels generate --views'") from None
    with other:
        m = other.meta
        if m.positions != "views":
            raise DataError(f"--views-from '{views_from}' is no complete format-2 views store (its positions are "
                            f"'{m.positions}'); pass a store written by 'softlabels generate --views'")
        units = [other.read_unit(u) for u in range(m.num_units)]  # each unit read once: ids and params
        ids = np.concatenate([b[fmt.SAMPLE_IDS] for b in units] or [np.empty(0)])
        other_data = fingerprint is not None and m.source.get("fingerprint") != fingerprint  # rank 0 checks it
        if m.num_samples != num_samples or other_data or not np.array_equal(ids, np.arange(num_samples)):
            raise DataError(f"--views-from '{views_from}' holds views of {m.num_samples} samples of other data "
                            f"than --data '{data}' ({num_samples} samples); pass a views store made from the same "
                            "--data")
        recorded = str(m.views["augment"])
        if augment is not None and augment != recorded:
            raise DataError(f"--augment '{augment}' is not the augmentation '{recorded}' of --views-from "
                            f"'{views_from}'; drop --augment, or pass the same one")
        if augment is None and ":" in recorded:  # data is never code: the user must name it
            raise DataError(f"--views-from '{views_from}' records the augmentation '{recorded}', which imports "
                            f"code, and code is never imported from a store; pass --augment '{recorded}' to name "
                            "it yourself")
        count = int(m.views["count"])
        if views is not None and views != count:
            raise DataError(f"--views {views} differs from the {count} views of --views-from '{views_from}'; drop "
                            "--views, or pass the same count")
        params = np.concatenate([b[VIEW_PARAMS] for b in units]).astype(np.float32)
        aug = parse_augment(recorded)
        view_shape(aug, input_shape)
        ranges = aug.param_ranges(tuple(input_shape[1:]))  # the data's size, recorded or not
        if ranges is not None and len(ranges.low) == params.shape[-1] and \
                (bad := ranges.problems(params, m.views["param_names"])):
            raise DataError(f"--views-from '{views_from}' holds view parameters that '{recorded}' never draws for "
                            f"inputs of {input_shape[1]}x{input_shape[2]} ({bad[0]}); regenerate it with "
                            "'softlabels generate --views'")
        # the recorded dtype holds these params exactly, whatever this version would choose
        return ViewPlan(aug, count, int(m.views["seed"]), str(m.views.get("param_dtype", "float32")), params)


class _Batches(Dataset):
    """Item ``(start, stop)`` -> ``(start, x, y)`` read with the dataset's vectorised ``get_batch``."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:  # pragma: no cover - the sampler decides
        return len(self.ds)

    def __getitem__(self, span: tuple[int, int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        start, stop = span
        x, y = self.ds.get_batch(np.arange(start, stop, dtype=np.int64))
        return start, x, y


class Teacher:
    """Runs the teacher on a batch, on the device, and checks that it returns [batch, classes] logits."""

    def __init__(self, module: torch.nn.Module, spec: str, *, device: torch.device, amp: str,
                 num_classes: int | None) -> None:
        self.module, self.spec, self.device = module, spec, device
        self.amp, self.num_classes = amp, num_classes

    def forward(self, x: torch.Tensor, where: str) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        try:
            with torch.inference_mode(), autocast(self.device, self.amp):
                out = self.module(x)
        except torch.OutOfMemoryError as err:
            raise ConfigError(f"out of memory running the teacher on {where} "
                              f"({one_line(err, 300)}); lower --batch-size") from err
        except Exception as err:  # user models raise anything
            raise ModelMismatch(f"teacher '{self.spec}' failed on {where} of shape {tuple(x.shape)}: "
                                f"{one_line(err, 300)}") from err
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelMismatch(f"teacher '{self.spec}' returned {got} for inputs of shape {tuple(x.shape)}; "
                                "it must return one row of raw logits per sample, [batch, classes]")
        if self.num_classes is not None and out.shape[1] != self.num_classes:
            raise ModelMismatch(
                f"teacher '{self.spec}' outputs {out.shape[1]} logits per sample but {self.num_classes} classes "
                f"are expected; pass --num-classes {out.shape[1]} if that is the class count, or use a teacher "
                f"for {self.num_classes} classes")
        return out


class ClassifyProducer:
    """A classifier teacher over samples, or over V views of each sample (the C1 producer protocol)."""

    def __init__(self, *, ds: Any, teacher: Teacher, meta: StoreMetaV2, views: ViewPlan | None,
                 num_workers: int, device: torch.device) -> None:
        self.ds, self.teacher, self._meta, self.views = ds, teacher, meta, views
        self.layout: Layout = meta.layout_obj()
        self.num_workers, self.device = num_workers, device
        self.input_shape = tuple(ds.input_shape)

    def meta(self) -> StoreMetaV2:
        return self._meta

    def lengths(self) -> np.ndarray | None:
        return None

    def batches(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        workers = self.num_workers if spans else 0  # forked now, before any thread starts
        it = iter(batch_loader(_Batches(self.ds), sampler=list(spans), num_workers=workers,
                               pin_memory=self.device.type == "cuda",
                               prefetch_factor=4 if workers else None))
        return ((start, self.encode(start, x, y)) for start, x, y in it)

    def encode(self, start: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
        """One span: teacher logits -> the layout's arrays on the device, then to host numpy."""
        n, c = len(x), self._meta.num_classes
        top_label = int(y.max()) if y.numel() else -1
        if top_label >= c:
            raise DataError(f"rows {start}..{start + n} have label {top_label} but there are {c} classes; pass the "
                            "right --num-classes or fix the labels")
        ids = torch.arange(start, start + n, dtype=torch.int64)
        where, v, count = f"samples {start}..{start + n}", self.views, 1
        with torch.inference_mode():
            if v is not None:  # the batch repeated V times, each copy augmented with its parameters
                # drawn from (seed, id, view) or the reused store's: exact in the plan's param_dtype
                # either way (draw_views rounds to it), so the teacher sees what is stored
                count, where = v.count, f"views of {where}"
                if v.params is not None:
                    params = torch.from_numpy(v.params[ids.numpy()]).to(self.device)
                else:
                    params = draw_views(v.aug, v.seed, ids.to(self.device), count, self.input_shape)
                xs = x.to(self.device, non_blocking=True).repeat_interleave(count, 0)
                x = v.aug.apply(xs, params.reshape(n * count, -1))
            z = self.teacher.forward(x, where)
            enc = self.layout.encode(z, sample_ids=ids.to(z.device).repeat_interleave(count),
                                     positions=torch.arange(count, device=z.device).repeat(n))
            lead = (n,) if v is None else (n, count)
            out = {k: to_numpy(t.cpu()).reshape(*lead, *t.shape[1:]) for k, t in enc.items()}
            if v is not None:
                out[VIEW_PARAMS] = params.cpu().numpy().astype(v.param_dtype)
        out[fmt.LABELS] = y.numpy().astype(np.int64, copy=False)
        out[fmt.SAMPLE_IDS] = ids.numpy()
        return out


def classify_producer(config: GenerateConfig, device: torch.device, dist: Dist, say: Callable[[str], None], *,
                      geometry: dict[str, int]) -> ClassifyProducer:
    """The producer of a classifier job: resolve its data and teacher (every rank) and run a first forward,
    which fails here, before any store exists. ``geometry``: the chunking adopted from the store resumed."""
    s = config
    ds = resolve_data(s.data)
    n = len(ds)
    if n == 0:
        raise DataError(f"--data {s.data!r} has no samples; nothing to generate")
    refuse_random_data(ds, s.data)  # else its store fails the fingerprint check at train time
    if s.allow_pickle and s.weights is None:
        say("warning: --allow-pickle has no effect without --weights; drop it")
    data_classes = class_count(ds)
    shape = tuple(ds.input_shape)
    c = s.num_classes or teacher_classes(s.teacher, input_shape=shape, data_classes=data_classes,
                                         weights=s.weights, allow_pickle=s.allow_pickle)
    if c is None and s.teacher in BUILTIN_MODELS:  # a random built-in on unlabeled data
        raise ConfigError(f"cannot tell the number of classes of --data {s.data!r} (it has no labels) for "
                          f"the untrained built-in teacher {s.teacher!r}; pass --weights (their output "
                          "width gives it) or --num-classes")
    if s.num_classes and data_classes and data_classes > s.num_classes:
        raise ConfigError(f"--num-classes {s.num_classes} is less than the {data_classes} classes of "
                          f"--data {s.data!r}; pass --num-classes {data_classes} or more")
    with torch.random.fork_rng(devices=[]):  # any random init comes from --seed, and is recorded
        torch.manual_seed(s.seed)
        info = resolve_model(s.teacher, input_shape=shape, num_classes=c or 1,  # c None: not a built-in
                             weights=s.weights, allow_pickle=s.allow_pickle)
    module = info.module.to(device)
    teacher = Teacher(module, s.teacher, device=device, amp=s.amp, num_classes=c)
    x, _ = ds.get_batch(np.arange(min(2, n), dtype=np.int64))
    width = teacher.forward(x, "inputs").shape[1]  # fails here, before any store exists, if it cannot run
    if c is None:  # the teacher's output width is the class count
        c = teacher.num_classes = width
    if data_classes and data_classes > c:
        raise ModelMismatch(f"--data {s.data!r} has labels up to {data_classes - 1} but teacher {s.teacher!r} "
                            f"outputs {c} logits per sample; use a teacher for {data_classes} classes, "
                            "or fix the labels")
    if s.layout == "topk" and s.topk is not None and s.topk > c:  # None: views' default, min(5, C)
        raise ConfigError(f"--topk {s.topk} is more than the {c} classes; pass --topk {c} or fewer")
    param = next(iter(module.parameters()), None)
    attrs = {**info.metadata(), "amp": s.amp, "device": device.type,
             "init_seed": s.seed if info.weights_sha256 is None else None,
             "param_dtype": str(param.dtype).removeprefix("torch.") if param is not None else None}
    # the fingerprint reads the data: rank 0 alone records (and checks) it
    source = {"spec": absolute_data_spec(s.data), "num_samples": n, "fingerprint": fingerprint(ds),
              "input_shape": list(ds.input_shape)} if dist.is_main else {}
    views = view_plan(views=s.views, augment=s.augment, views_from=s.views_from, seed=s.seed, num_samples=n,
                      fingerprint=source.get("fingerprint"), input_shape=shape, data=s.data)
    if s.views_from:
        source["views_from"] = str(Path(s.views_from).resolve())
    layout = make_layout(s.layout, num_classes=c, logits_dtype=s.dtype,
                         **s.layout_params(min(DEFAULT_VIEW_TOPK, c)))  # views' default K: docs/VIEWS.md
    per_sample = layout.bytes_per_position * (views.count if views else 1)  # ~1 MiB chunks, none padded:
    chunk = s.chunk_rows or geometry.get("chunk_rows") or min(fmt.default_chunk_rows(per_sample, 1), n)
    shard = s.shard_chunks or geometry.get("shard_chunks") or 1
    meta = StoreMetaV2(positions="views" if views else "sample", layout=s.layout, num_samples=n, num_classes=c,
                       logits_dtype=s.dtype, chunk_samples=chunk, shard_chunks=shard,
                       group_units=geometry.get("group_units") or group_units_for(math.ceil(n / (chunk * shard))),
                       layout_params=layout.params(), views=views.attrs() if views else None, teacher=attrs,
                       source=source, created_by={"settings": {"batch_size": s.batch_size, "amp": s.amp,
                                                               "seed": s.seed, "random_teacher": s.random_teacher}})
    return ClassifyProducer(ds=ds, teacher=teacher, meta=meta, views=views, num_workers=s.num_workers, device=device)

