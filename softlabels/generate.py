"""The teacher job: run a teacher once over a dataset and store its raw logits.

``generate(teacher, data, out, ...)`` resolves the specs, checks the teacher on a
first tiny batch (so a model that does not fit its inputs fails before any store
exists), takes the store's lock (``STORE.lock``, :mod:`softlabels._lock`), then
creates the store or resumes it: only write units (chunks, or whole shards) whose
``chunk_done`` flags are missing are computed. Batches start at unit boundaries
(:mod:`softlabels._pipeline`), so a resumed store is bit-identical to a one-shot
one. A background thread writes while the teacher computes; the store is marked
complete last, and only if every unit was written.

Multi-process (``torchrun --nproc-per-node=P``; ``WORLD_SIZE`` > 1): every rank
resolves the specs and checks the teacher; rank 0 alone takes the lock and
creates, validates or repairs the store; the missing units are dealt round-robin
(unit ``missing[i]`` goes to rank ``i % P``); rank 0 finishes the store.

* Zarr: every rank opens the store and writes its own units. A unit is a separate
  set of files (a chunk, or a shard) and ``chunk_done``/``checksums`` keep one file
  per element, so concurrent writers never share a file.
* HDF5 cannot take concurrent writers (without MPI-IO), so rank 0 is the only
  writer. The job runs in rounds: in round r every rank computes its r-th unit,
  the finished rows go to rank 0 (``gather_object``), and rank 0's background
  thread writes and flags them. Progress is durable unit by unit exactly as in one
  process, and no part files need merging; the price is that ranks move in
  lockstep rounds and each unit crosses the process group once.

In both cases errors are agreed on collectively, so one rank's failure stops all
ranks with the same one-line error, and the result equals the one-process store
bit for bit (for a deterministic teacher on the same device type and batch size;
on CPU, BLAS libraries may round differently with another thread count).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from softlabels import _distributed, _signals
from softlabels import format as fmt
from softlabels._jobstore import Settings, open_job_store, scan_nonfinite
from softlabels._lock import StoreLock
from softlabels._pipeline import BackgroundWriter, Teacher, batch_spans, make_loader, unit_delay_hook
from softlabels._progress import progress
from softlabels._trainutil import resolve_device, set_threads
from softlabels.augment import refuse_random_data
from softlabels.data import class_count, fingerprint
from softlabels.errors import ConfigError, DataError, ModelMismatch
from softlabels.models import BUILTIN_MODELS
from softlabels.specs import absolute_data_spec, resolve_data, resolve_model, teacher_classes
from softlabels.writer import StoreWriter

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
    and their meaning: :class:`softlabels.config.GenerateConfig`.
    Format 2 (``views``/``augment``/``views_from``, ``layout="sampled"``, ``format_version=2``):
    :mod:`softlabels.job.classify`. Token data (``text:``, ``tokenizer``, ``seq_len``, an LM teacher):
    :mod:`softlabels.job.tokens`.
    """
    if layout is None:  # views: top-k with a small K (docs/VIEWS.md); else every logit
        layout = "topk" if views is not None or views_from is not None else "dense"
    s = Settings(teacher=teacher, data=data, out=Path(out), weights=None if weights is None else str(weights),
                 allow_pickle=allow_pickle, random_teacher=random_teacher, seed=seed, layout=layout, topk=topk,
                 samples=samples, views=views, augment=augment, views_from=None if views_from is None else str(views_from),
                 format_version=format_version, dtype=dtype, batch_size=batch_size, num_workers=num_workers, device=device, threads=threads, amp=amp,
                 chunk_rows=chunk_rows, shard_chunks=shard_chunks, num_classes=num_classes, overwrite=overwrite,
                 on_nonfinite=on_nonfinite, repair=repair, progress=progress, seq_len=seq_len,
                 tokenizer=None if tokenizer is None else str(tokenizer))
    problems = s.problems()
    if problems:
        raise ConfigError(problems)
    set_threads(threads)
    dev = resolve_device(device)
    dist = _distributed.init(dev.type)
    job = _Job(s, dist, dev, echo if echo is not None and dist.is_main else (lambda _line: None))
    try:
        from softlabels.job.tokens import is_token_job

        if is_token_job(s):  # a causal-LM teacher over token data: softlabels.job.tokens
            from softlabels.job.tokens import generate_tokens

            return generate_tokens(s, dist, job.say)
        if _format_of(s) == 2:
            from softlabels.job.classify import generate_v2

            return generate_v2(job)
        return job.run()
    finally:
        job.close()


def _format_of(s: Settings) -> int:
    """The format to write: asked, needed (views, sampled), or the resumed store's; else 1."""
    if s.format_version is not None or s.needs_format2:
        return s.format_version or 2
    from softlabels.job.runner import store_format

    return 2 if not s.overwrite and s.out.exists() and store_format(s.out) == 2 else 1


@dataclass
class _Job:
    s: Settings
    dist: _distributed.Dist
    dev: torch.device
    say: Callable[[str], None]
    t0: float = field(default_factory=time.perf_counter)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    lock: StoreLock | None = None
    writer: StoreWriter | None = None
    create: Callable[[], StoreWriter] | None = None  # a new store, made on the writer thread

    def run(self) -> GenerateResult:
        exc = None
        try:
            self._prepare()
        except Exception as err:  # noqa: BLE001 - agreed on by every rank, then raised
            exc = err
        self.dist.agree(exc)
        plan = self._broadcast_plan()
        n, missing = self.n, plan["missing"]
        self.unit_rows = plan["unit_rows"]
        if plan["complete"]:
            return GenerateResult(self.s.out, n, 0, time.perf_counter() - self.t0, 0.0, already_complete=True,
                                  repaired_chunks=tuple(plan["repaired"]), is_main=self.dist.is_main)
        rows = sum(b - a for a, b in map(self._bounds, missing))
        shown = self.dist.is_main and self.s.progress is not False
        self.bar = progress(total=rows, desc="generate", unit="samples", show=self.s.progress if shown else False,
                            say=self.say if shown else (lambda _line: None), unit_scale=True)
        with self.bar:
            if self.dist.active and self.s.out.suffix.lower() != ".zarr":
                self._compute_gathered(missing)
            else:
                self._compute_local(missing)
        exc, ids = None, ()
        if self.dist.is_main:
            try:
                ids = self._finish(rows)
            except Exception as err:  # noqa: BLE001
                exc = err
        self.dist.agree(exc)
        wall = time.perf_counter() - self.t0
        return GenerateResult(self.s.out, n, rows, wall, rows / wall if wall > 0 else 0.0,
                              repaired_chunks=tuple(plan["repaired"]), nonfinite_sample_ids=tuple(ids),
                              is_main=self.dist.is_main)

    # -- phase 1, every rank: specs, class count, a first forward ------------------------------
    def _prepare(self) -> None:
        s = self.s
        self.ds = ds = resolve_data(s.data)
        self.n = len(ds)
        if self.n == 0:
            raise DataError(f"--data {s.data!r} has no samples; nothing to generate")
        refuse_random_data(ds, s.data)  # else its store fails the fingerprint check at train time
        if s.allow_pickle and s.weights is None:
            self.say("warning: --allow-pickle has no effect without --weights; drop it")
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
        module = info.module.to(self.dev)
        self.teacher = Teacher(module, s.teacher, device=self.dev, amp=s.amp, layout=s.layout, topk=s.topk,
                               logits_dtype=s.dtype, num_classes=c)
        x, _ = ds.get_batch(np.arange(min(2, self.n), dtype=np.int64))
        width = self.teacher.forward(x, "inputs").shape[1]  # fails here, before any store exists, if it cannot run
        if c is None:  # the teacher's output width is the class count
            c = self.teacher.num_classes = width
        if data_classes and data_classes > c:
            raise ModelMismatch(f"--data {s.data!r} has labels up to {data_classes - 1} but teacher {s.teacher!r} "
                                f"outputs {c} logits per sample; use a teacher for {data_classes} classes, "
                                "or fix the labels")
        if s.layout == "topk" and s.topk is not None and s.topk > c:  # None: views' default, min(5, C)
            raise ConfigError(f"--topk {s.topk} is more than the {c} classes; pass --topk {c} or fewer")
        self.c = c
        param = next(iter(module.parameters()), None)
        self.teacher_attrs = {**info.metadata(), "amp": s.amp, "device": self.dev.type,
                              "init_seed": s.seed if info.weights_sha256 is None else None,
                              "param_dtype": str(param.dtype).removeprefix("torch.") if param is not None else None}
        if self.dist.is_main:
            self.source_attrs = {"spec": absolute_data_spec(s.data), "num_samples": self.n,
                                 "fingerprint": fingerprint(ds),
                                 "input_shape": list(ds.input_shape)}

    # -- phase 2, rank 0: lock, create / validate / repair ------------------------------------
    def _broadcast_plan(self) -> dict[str, Any]:
        plan, exc = None, None
        if self.dist.is_main:
            try:
                self.lock = StoreLock(self.s.out)
                self.lock.acquire()  # before touching (or overwriting) anything
                # Every Zarr rank opens the store itself, so it must exist before they start;
                # otherwise only rank 0 writes, and its writer thread creates the store.
                shared = self.dist.active and self.s.out.suffix.lower() == ".zarr"
                store = open_job_store(self.s, num_samples=self.n, num_classes=self.c, teacher=self.teacher_attrs,
                                       source=self.source_attrs, say=self.say, defer_create=not shared)
                self.writer, self.create = store.writer, store.create
                if store.complete:
                    self.writer.close()
                plan = {"missing": store.missing, "unit_rows": store.unit_rows, "complete": store.complete,
                        "repaired": store.repaired}
            except Exception as err:  # noqa: BLE001
                exc = err
        self.dist.agree(exc)
        return self.dist.broadcast(plan)

    # -- phase 3, every rank: compute its units ---------------------------------------------
    def _bounds(self, unit: int) -> tuple[int, int]:
        return unit * self.unit_rows, min((unit + 1) * self.unit_rows, self.n)

    def _mine(self, missing: list[int]) -> tuple[list[int], Any]:
        units = missing[self.dist.rank::self.dist.world]
        spans = batch_spans(units, self._bounds, self.s.batch_size)
        it = make_loader(self.ds, spans, num_workers=self.s.num_workers if spans else 0,
                         pin_memory=self.dev.type == "cuda")
        return units, it

    def _queue_depth(self) -> int:
        """Blocks the writer may lag behind: ~64 MiB of output, so a slow flush or the
        store's creation (HDF5 pre-allocates every chunk) never stalls the teacher."""
        width = self.c * 4 if self.s.layout == "dense" else self.s.topk * 8 + 4
        return int(min(1024, max(8, (64 << 20) // (self.s.batch_size * (width + 16)))))

    def _blocks(self, it: Any, stop_row: int | None = None):
        """Teacher output blocks from the loader (up to the end of the unit ending at ``stop_row``)."""
        for start, x, y in it:
            _signals.check()  # a stop signal whose KeyboardInterrupt was swallowed
            yield self.teacher.block(start, x, y)
            self.bar.update(min(len(x) * self.dist.world, self.bar.total - self.bar.n))  # ranks progress alike
            end = start + len(x)
            if end == self._bounds(start // self.unit_rows)[1]:
                unit_delay_hook()
                if end == stop_row:
                    return

    def _compute_local(self, missing: list[int]) -> None:
        """Each rank writes its own units (one process, or Zarr under torchrun)."""
        exc = None
        units, it = self._mine(missing)
        bw = None
        try:
            if units:
                if self.dist.is_main:
                    target = self.writer or self.create
                else:
                    target = StoreWriter.resume(self.s.out, finalize_on_exit=False)
                bw = BackgroundWriter(target, on_nonfinite=self.s.on_nonfinite, depth=self._queue_depth())
                try:
                    for block in self._blocks(it):
                        bw.put(block)
                finally:
                    _close_quietly(bw)  # the error already being raised wins
                bw.check()  # else the writer thread's error, if any
        except Exception as err:  # noqa: BLE001
            exc = err
        finally:
            if bw is not None and self.dist.is_main:
                self.writer = bw.writer
            elif bw is not None and bw.writer is not None:
                bw.writer.close()
        self.dist.agree(exc)

    def _compute_gathered(self, missing: list[int]) -> None:
        """HDF5 under torchrun: rank 0 writes every unit; see the module docstring."""
        dist = self.dist
        units, it = self._mine(missing)
        bw = (BackgroundWriter(self.writer or self.create, on_nonfinite=self.s.on_nonfinite,
                               depth=self._queue_depth() * dist.world) if dist.is_main else None)
        own: Exception | None = None
        verdict = None
        for r in range(math.ceil(len(missing) / dist.world)):
            payload: Any = []
            if r < len(units):
                try:
                    payload = [b.to_cpu() for b in self._blocks(it, self._bounds(units[r])[1])]
                except Exception as err:  # noqa: BLE001
                    own, payload = err, ("error", _distributed.pack_error(err))
            got = dist.gather(payload)
            if dist.is_main:
                verdict = next((p[1] for p in got if isinstance(p, tuple)), None)
                try:
                    for blocks in ([] if verdict else got):
                        for b in blocks:
                            bw.put(b)
                except Exception as err:  # noqa: BLE001
                    own, verdict = err, _distributed.pack_error(err)
            verdict = dist.broadcast(verdict)
            if verdict is not None:
                break
        if bw is not None:
            try:
                bw.close()
            except Exception as err:  # noqa: BLE001
                own, verdict = own or err, verdict or _distributed.pack_error(err)
            self.writer = bw.writer
        verdict = dist.broadcast(verdict)
        if verdict is not None:
            raise own or _distributed.unpack_error(verdict)

    # -- phase 4, rank 0: attributes, then status complete ---------------------------------
    def _finish(self, rows: int) -> list[int]:
        ids: list[int] = []
        w = self.writer
        if self.s.on_nonfinite == "record":  # scan the whole store: earlier runs may have found some too
            w.close()
            ids = scan_nonfinite(self.s.out)
            w = self.writer = StoreWriter.resume(self.s.out, finalize_on_exit=False)
            if ids:
                self.say(f"warning: stored non-finite teacher logits for {len(ids)} sample(s): "
                         f"{fmt.chunk_list(ids, 10)} (listed in created_by.nonfinite_sample_ids)")
        wall = time.perf_counter() - self.t0
        created: dict[str, Any] = {"timings": {
            "wall_seconds": round(wall, 3), "samples_per_second": round(rows / wall, 1) if wall > 0 else None,
            "rows_generated": rows, "ranks": self.dist.world, "started_at": self.started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
        if self.s.on_nonfinite == "record":
            created["nonfinite_sample_ids"] = ids
        w.update_attrs(created_by=created)
        w.finish()
        return ids

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()


def _close_quietly(bw: BackgroundWriter) -> None:
    try:
        bw.close()
    except Exception:  # noqa: BLE001 - the error already being raised wins
        pass
