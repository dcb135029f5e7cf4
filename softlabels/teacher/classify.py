"""The classifier-teacher producer: ``sample`` and ``views`` stores, any layout.

``generate`` resolves and checks the teacher and data (:mod:`softlabels.teacher.job`);
:class:`ClassifyProducer` then turns each span of samples into the layout's arrays, and
:func:`softlabels.teacher.runner.run_job` writes them: into a format-2 store described by
:func:`store_meta`, or into a format-1 store (``sample`` positions, dense or top-k: the same
arrays under the same names) through the runner's v1 sink.

Views: view ``v`` of sample ``i`` has parameters drawn from ``(seed, i, v)``
(``softlabels.inputs.augment``), or read from another views store (``--views-from``); the batch
is repeated ``V`` times on the device, each copy augmented with its own parameters, and
the teacher runs on the ``n·V`` views (``--batch-size`` counts views, so a span holds
``batch_size // V`` samples). The ``sampled`` layout seeds its draws per (sample id,
view index): position 0 for ``sample`` stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from softlabels.errors import DataError, SoftLabelsError
from softlabels.inputs.augment import (
    Compose,
    draw_views,
    param_dtype,
    parse_augment,
    view_shape,
)
from softlabels.store import format as fmt
from softlabels.store.layouts import Layout, make_layout, to_numpy
from softlabels.store.positions import group_units_for
from softlabels.store.positions.views import VIEW_PARAMS
from softlabels.store.reader import UnitStore
from softlabels.store.schema import StoreMetaV2
from softlabels.teacher.pipeline import Teacher, make_loader

__all__ = ["DEFAULT_VIEW_TOPK", "ClassifyProducer", "ViewPlan", "adopted_geometry", "store_meta", "view_plan"]

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
        # the recorded dtype holds these params exactly, whatever this version would choose
        return ViewPlan(aug, count, int(m.views["seed"]), str(m.views.get("param_dtype", "float32")), params)


def store_meta(*, layout: str, topk: int | None, samples: int | None, dtype: str, seed: int, num_samples: int,
               num_classes: int, chunk_rows: int | None, shard_chunks: int | None, group_units: int | None,
               views: ViewPlan | None, teacher: dict[str, Any], source: dict[str, Any],
               settings: dict[str, Any]) -> StoreMetaV2:
    """The v2 store of a classifier job: ~1 MiB chunks unless ``chunk_rows`` is given."""
    params = {"topk": {"k": topk}, "sampled": {"samples": samples, "seed": seed}}.get(layout, {})
    lay = make_layout(layout, num_classes=num_classes, logits_dtype=dtype, **params)
    per_sample = lay.bytes_per_position * (views.count if views else 1)
    chunk = chunk_rows or min(fmt.default_chunk_rows(per_sample, 1), max(1, num_samples))  # no padded chunk
    shard = shard_chunks or 1
    group = group_units or group_units_for(math.ceil(num_samples / (chunk * shard)))
    return StoreMetaV2(positions="views" if views else "sample", layout=layout, num_samples=num_samples,
                       num_classes=num_classes, logits_dtype=dtype, chunk_samples=chunk, shard_chunks=shard,
                       group_units=group, layout_params=lay.params(),
                       views=views.attrs() if views else None, teacher=teacher, source=source,
                       created_by={"settings": settings})


def adopted_geometry(out: Path) -> dict[str, int]:
    """An existing v2 store's chunking, adopted by a rerun that does not give its own."""
    try:
        with UnitStore(out, allow_partial=True) as store:
            m = store.meta
            return {"chunk_rows": m.chunk_samples, "shard_chunks": m.shard_chunks, "group_units": m.group_units}
    except SoftLabelsError:  # damaged or no v2 store: the runner says what is wrong
        return {}


class ClassifyProducer:
    """A classifier teacher over samples, or over V views of each sample (the C1 producer protocol)."""

    def __init__(self, *, ds: Any, teacher: Teacher, meta: StoreMetaV2, views: ViewPlan | None,
                 num_workers: int, device: torch.device, noun: str = "samples") -> None:
        self.ds, self.teacher, self._meta, self.views = ds, teacher, meta, views
        self.noun = noun  # what messages call a span's items ("rows" of a format-1 store)
        self.layout: Layout = meta.layout_obj()
        self.num_workers, self.device = num_workers, device
        self.input_shape = tuple(ds.input_shape)

    def meta(self) -> StoreMetaV2:
        return self._meta

    def lengths(self) -> np.ndarray | None:
        return None

    def batches(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        it = make_loader(self.ds, list(spans), num_workers=self.num_workers if spans else 0,
                         pin_memory=self.device.type == "cuda")  # forks the workers now, before any thread
        return ((start, self.encode(start, x, y)) for start, x, y in it)

    def view_params(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [n, V, P] on the device: drawn from (seed, id, view), or the reused store's; either way
        exact in the plan's ``param_dtype`` (draw_views rounds to it), so the teacher sees what is stored."""
        v = self.views
        if v.params is not None:
            return torch.from_numpy(v.params[ids.numpy()]).to(self.device)
        return draw_views(v.aug, v.seed, ids.to(self.device), v.count, self.input_shape)

    def encode(self, start: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
        """One span: teacher logits -> the layout's arrays on the device, then to host numpy."""
        n, c = len(x), self._meta.num_classes
        top_label = int(y.max()) if y.numel() else -1
        if top_label >= c:
            raise DataError(f"rows {start}..{start + n} have label {top_label} but there are {c} classes; pass the "
                            "right --num-classes or fix the labels")
        ids = torch.arange(start, start + n, dtype=torch.int64)
        where = f"{self.noun} {start}..{start + n}"
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            if self.views is None:
                z = self.teacher.forward(x, where)
                enc = self.layout.encode(z, sample_ids=ids.to(z.device), positions=torch.zeros_like(ids, device=z.device))
                out = {k: to_numpy(t.cpu()) for k, t in enc.items()}
            else:
                count = self.views.count
                params = self.view_params(ids)
                xs = x.to(self.device, non_blocking=True).repeat_interleave(count, 0)
                z = self.teacher.forward(self.views.aug.apply(xs, params.reshape(n * count, -1)), f"views of {where}")
                enc = self.layout.encode(z, sample_ids=ids.to(z.device).repeat_interleave(count),
                                         positions=torch.arange(count, device=z.device).repeat(n))
                out = {k: to_numpy(t.cpu()).reshape(n, count, *t.shape[1:]) for k, t in enc.items()}
                out[VIEW_PARAMS] = params.cpu().numpy().astype(self.views.param_dtype)
        out[fmt.LABELS] = y.numpy().astype(np.int64, copy=False)
        out[fmt.SAMPLE_IDS] = ids.numpy()
        return out
