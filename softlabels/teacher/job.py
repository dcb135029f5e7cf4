"""The teacher job: run a teacher once over a dataset and store its raw logits.

``generate(teacher, data, out, ...)`` resolves the specs, checks the teacher on a
first tiny batch (so a model that does not fit its inputs fails before any store
exists), builds the classifier producer (:class:`softlabels.teacher.classify.ClassifyProducer`)
and hands it to the job runner (:func:`softlabels.teacher.runner.run_job`), which takes the
store's lock (``STORE.lock``), creates or resumes the store (only write units whose done
flags are missing are computed), writes on a background thread while the teacher computes,
and marks the store complete last, only if every unit was written. A format-1 store goes
through the runner's v1 sink (``softlabels.teacher.v1sink.V1Sink``), a format-2 one through its
v2 sink. Batches are ``--batch-size`` samples on one global grid whatever the chunk size,
so a resumed store is bit-identical to a one-shot one.

Multi-process (``torchrun --nproc-per-node=P``; ``WORLD_SIZE`` > 1): every rank
resolves the specs and checks the teacher; rank 0 alone takes the lock and creates,
validates or repairs the store; Zarr ranks each write their own units, HDF5 ranks send
their rows to rank 0, the one writer (:mod:`softlabels.teacher.runner`). Errors are agreed on
collectively, so one rank's failure stops all ranks with the same one-line error, and the
result equals the one-process store bit for bit (for a deterministic teacher on the same
device type and batch size; on CPU, BLAS libraries may round differently with another
thread count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from softlabels._runtime import distributed as _distributed
from softlabels._runtime.device import resolve_device, set_threads
from softlabels.errors import ConfigError, DataError, ModelMismatch
from softlabels.inputs.arrays import class_count
from softlabels.inputs.fingerprints import fingerprint
from softlabels.inputs.augment import refuse_random_data
from softlabels.inputs.spec import absolute_data_spec, resolve_data
from softlabels.teacher.classify import (
    DEFAULT_VIEW_TOPK,
    ClassifyProducer,
    adopted_geometry,
    store_meta,
    view_plan,
)
from softlabels.teacher.models import BUILTIN_MODELS
from softlabels.teacher.pipeline import Teacher
from softlabels.teacher.runner import run_job
from softlabels.teacher.sinks import Sink, store_format
from softlabels.teacher.spec import resolve_model, teacher_classes
from softlabels.teacher.v1sink import Settings, V1Sink

__all__ = ["GenerateResult", "generate"]


@dataclass(frozen=True)
class GenerateResult:
    """What a :func:`generate` call did (timings are for this call only)."""

    path: Path
    num_samples: int
    rows_generated: int
    seconds: float
    samples_per_second: float
    already_complete: bool = False
    repaired_chunks: tuple[int, ...] = ()
    nonfinite_sample_ids: tuple[int, ...] = ()
    is_main: bool = True  # False on ranks other than 0 (they print nothing)


def generate(
    teacher: str,
    data: str,
    out: str | Path,
    *,
    weights: str | Path | None = None,
    allow_pickle: bool = False,
    random_teacher: bool = False,
    seed: int = 0,
    layout: str | None = None,
    topk: int | None = None,
    samples: int | None = None,
    views: int | None = None,
    augment: str | None = None,
    views_from: str | Path | None = None,
    format_version: int | None = None,
    dtype: str = "float32",
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    threads: int = 1,
    amp: str = "none",
    chunk_rows: int | None = None,
    shard_chunks: int | None = None,
    num_classes: int | None = None,
    overwrite: bool = False,
    on_nonfinite: str = "error",
    repair: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    seq_len: int | None = None,
    tokenizer: str | Path | None = None,
    compress: bool = False,
) -> GenerateResult:
    """Run ``teacher`` over ``data`` and write its raw logits to the store ``out``.

    Reruns resume an unfinished store (same settings required; ``chunk_rows`` and
    ``shard_chunks`` left as ``None`` adopt the store's). ``repair`` re-verifies the
    checksums and regenerates bad chunks. ``num_classes=None`` takes the teacher's
    class count (a built-in's from its weights, any other's from its output width).
    ``threads`` sets torch's CPU threads (0: torch's default). ``progress=None``
    shows a bar on a TTY and a line every 30 s through ``echo`` otherwise. ``echo``
    receives status lines (warnings, repairs, progress) on rank 0. A built-in teacher
    needs ``weights``, or ``random_teacher=True`` (tests): its init is seeded by ``seed``,
    which the store records, so a resumed store holds one teacher. Option defaults
    and their meaning: :class:`softlabels.teacher.config.GenerateConfig`.
    Format 2 (``views``/``augment``/``views_from``, ``layout="sampled"``, ``format_version=2``):
    :mod:`softlabels.teacher.classify`. Token data (``text:``, ``tokenizer``, ``seq_len``, an LM teacher):
    :mod:`softlabels.teacher.tokens`.
    """
    if layout is None:  # views: top-k with a small K (docs/VIEWS.md); else every logit
        layout = "topk" if views is not None or views_from is not None else "dense"
    s = Settings(teacher=teacher, data=data, out=Path(out), weights=None if weights is None else str(weights),
                 allow_pickle=allow_pickle, random_teacher=random_teacher, seed=seed, layout=layout, topk=topk,
                 samples=samples, views=views, augment=augment, views_from=None if views_from is None else str(views_from),
                 format_version=format_version, dtype=dtype, batch_size=batch_size, num_workers=num_workers, device=device, threads=threads, amp=amp,
                 chunk_rows=chunk_rows, shard_chunks=shard_chunks, num_classes=num_classes, overwrite=overwrite,
                 on_nonfinite=on_nonfinite, repair=repair, progress=progress, seq_len=seq_len,
                 tokenizer=None if tokenizer is None else str(tokenizer), compress=compress)
    problems = s.problems()
    if problems:
        raise ConfigError(problems)
    set_threads(threads)
    dev = resolve_device(device)
    dist = _distributed.init(dev.type)
    say = echo if echo is not None and dist.is_main else (lambda _line: None)
    from softlabels.teacher.tokens import is_token_job

    if is_token_job(s):  # a causal-LM teacher over token data: softlabels.teacher.tokens
        from softlabels.teacher.tokens import generate_tokens

        return generate_tokens(s, dist, say)
    fmt2 = _format_of(s) == 2
    exc, producer, sink = None, None, None
    try:
        t = _prepare(s, dev, dist, say)
        producer, sink = _producer(s, t, dev, fmt2)
    except Exception as err:  # noqa: BLE001 - agreed on by every rank, then raised
        exc = err
    dist.agree(exc)
    views = producer.views
    r = run_job(producer, s.out, batch_size=max(1, s.batch_size // views.count) if views else s.batch_size,
                overwrite=s.overwrite, repair=s.repair, on_nonfinite=s.on_nonfinite, dist=dist, say=say,
                progress=s.progress if dist.is_main and s.progress is not False else False, sink=sink,
                compress=s.compress)
    return GenerateResult(r.path, r.num_samples, r.samples_generated, r.seconds, r.samples_per_second,
                          already_complete=r.already_complete, repaired_chunks=r.repaired_units,
                          nonfinite_sample_ids=r.nonfinite_sample_ids, is_main=r.is_main)


def _format_of(s: Settings) -> int:
    """The format to write: asked, needed (views, sampled), or the resumed store's; else 1."""
    if s.format_version is not None or s.needs_format2:
        return s.format_version or 2
    return 2 if not s.overwrite and s.out.exists() and store_format(s.out) == 2 else 1


@dataclass(frozen=True)
class _Prepared:
    """The resolved data and teacher of a job (``source`` only on rank 0: the fingerprint reads the data)."""

    ds: Any
    n: int
    c: int
    teacher: Teacher
    teacher_attrs: dict[str, Any]
    source: dict[str, Any]


def _prepare(s: Settings, dev: torch.device, dist: _distributed.Dist, say: Callable[[str], None]) -> _Prepared:
    """Every rank: specs, class count, a first forward (which fails here, before any store exists)."""
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
    module = info.module.to(dev)
    teacher = Teacher(module, s.teacher, device=dev, amp=s.amp, num_classes=c)
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
    attrs = {**info.metadata(), "amp": s.amp, "device": dev.type,
             "init_seed": s.seed if info.weights_sha256 is None else None,
             "param_dtype": str(param.dtype).removeprefix("torch.") if param is not None else None}
    source = ({"spec": absolute_data_spec(s.data), "num_samples": n, "fingerprint": fingerprint(ds),
               "input_shape": list(ds.input_shape)} if dist.is_main else {})
    return _Prepared(ds, n, c, teacher, attrs, source)


def _producer(s: Settings, t: _Prepared, dev: torch.device, fmt2: bool) -> tuple[ClassifyProducer, Sink | None]:
    """The classifier producer and, for a format-1 store, its sink (format 2: the producer's meta)."""
    views = view_plan(views=s.views, augment=s.augment, views_from=s.views_from, seed=s.seed, num_samples=t.n,
                      fingerprint=t.source.get("fingerprint"), input_shape=tuple(t.ds.input_shape), data=s.data)
    geometry = {} if not fmt2 or s.overwrite or not s.out.exists() else adopted_geometry(s.out)
    settings = {"batch_size": s.batch_size, "amp": s.amp, "seed": s.seed, "random_teacher": s.random_teacher}
    topk = s.topk or (min(DEFAULT_VIEW_TOPK, t.c) if s.layout == "topk" else None)
    source = {**t.source, **({"views_from": str(Path(s.views_from).resolve())} if s.views_from else {})}
    meta = store_meta(layout=s.layout, topk=topk, samples=s.samples, dtype=s.dtype, seed=s.seed, num_samples=t.n,
                      num_classes=t.c, chunk_rows=(s.chunk_rows or geometry.get("chunk_rows")) if fmt2 else None,
                      shard_chunks=(s.shard_chunks or geometry.get("shard_chunks")) if fmt2 else None,
                      group_units=geometry.get("group_units"), views=views, teacher=t.teacher_attrs, source=source,
                      settings=settings)
    producer = ClassifyProducer(ds=t.ds, teacher=t.teacher, meta=meta, views=views, num_workers=s.num_workers,
                                device=dev, noun="samples" if fmt2 else "rows")
    if fmt2:
        return producer, None
    return producer, V1Sink(s, num_samples=t.n, num_classes=t.c, teacher=t.teacher_attrs, source=t.source)
