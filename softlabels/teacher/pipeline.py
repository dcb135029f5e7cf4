"""The teacher job's moving parts: input loader, teacher step, background writer.

The job runner (:mod:`softlabels.teacher.runner`) plans the batches and drives them; the
classifier producer (:mod:`softlabels.teacher.classify`) runs the teacher through :class:`Teacher`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import nullcontext
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.errors import ConfigError, ModelMismatch, NonFiniteOutputs
from softlabels.inputs.loader import batch_loader
from softlabels.store import format as fmt
from softlabels.store.layouts import finite_rows
from softlabels.teacher.producer import slice_samples

__all__ = ["BackgroundWriter", "Teacher", "make_loader", "sample_of_rows"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def make_loader(ds: Any, spans: list[tuple[int, int]], *, num_workers: int, pin_memory: bool) -> Iterator:
    """An iterator over ``(start, x, y)`` batches, in ``spans`` order.

    Call it *before* starting any thread: worker processes are forked here, and a
    fork while another thread holds a library lock (h5py's) can deadlock a worker.
    """
    loader = batch_loader(_Batches(ds), sampler=spans, num_workers=num_workers, pin_memory=pin_memory,
                          prefetch_factor=4 if num_workers else None)
    return iter(loader)


class Teacher:
    """Runs the teacher on a batch, on the device, and checks that it returns [batch, classes] logits."""

    def __init__(self, module: torch.nn.Module, spec: str, *, device: torch.device, amp: str,
                 num_classes: int | None) -> None:
        self.module, self.spec, self.device = module, spec, device
        amp_dtype = AMP_DTYPES[amp]
        self._autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, where: str) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        try:
            with torch.inference_mode(), self._autocast():
                out = self.module(x)
        except torch.OutOfMemoryError as err:
            raise ConfigError(f"out of memory running the teacher on {where} ({_one_line(err)}); "
                              "lower --batch-size") from err
        except Exception as err:  # user models raise anything
            raise ModelMismatch(f"teacher '{self.spec}' failed on {where} of shape {tuple(x.shape)}: "
                                f"{_one_line(err)}") from err
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


class BackgroundWriter:
    """Writes the job runner's ``(start, arrays)`` pieces to a ``UnitWriter`` on a thread, behind a bounded
    buffer, and checks them for non-finite values there (``position_keys``: the arrays to check; ``cum``,
    tokens only: the first position of every sample, and N + 1 the total).

    The teacher waits only when ``depth`` items are pending. The thread writes in bursts of
    ``burst`` items (or whatever is pending after ``linger`` seconds), each one
    ``UnitWriter.burst``: one flush of its data, then one of its flags. When the teacher keeps
    every CPU core busy, each wake-up of the writer (and of the storage library's own threads)
    stalls a parallel op of the teacher, so few long bursts cost less than many short ones.
    An error in the thread is raised in the caller at its next :meth:`put` or at
    :meth:`close`; after an error the thread keeps draining without writing, so the caller
    never blocks.
    """

    def __init__(self, writer: Any, position_keys: list[str], cum: np.ndarray | None, *, on_nonfinite: str,
                 depth: int = 8, burst: int | None = None, linger: float = 0.25) -> None:
        self.writer, self.position_keys, self.cum = writer, position_keys, cum
        self.on_nonfinite = on_nonfinite
        self._depth, self._burst, self._linger = depth, burst or max(1, depth // 2), linger
        self._pending: list[Any] = []
        self._closed = False
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._kill_after = int(os.environ.get("SOFTLABELS_TEST_KILL_AFTER_UNITS", "0"))  # test hook
        self._missing0 = len(writer.missing_units()) if self._kill_after else 0
        self._thread = threading.Thread(target=self._run, name="softlabels-writer", daemon=True)
        self._thread.start()

    def put(self, block: Any) -> None:
        with self._cv:
            while len(self._pending) >= self._depth and self._error is None:
                self._cv.wait()
            self.check()
            self._pending.append(block)
            if len(self._pending) in (1, self._burst):  # start the linger clock, or a burst is ready
                self._cv.notify_all()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write everything pending, stop the thread, and raise its error if it had one."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self.check()

    def _run(self) -> None:
        while True:
            with self._cv:
                deadline = None
                while not self._closed and len(self._pending) < self._burst:
                    if self._pending:  # something waits: write it within `linger` seconds
                        deadline = deadline or time.monotonic() + self._linger
                        if time.monotonic() >= deadline:
                            break
                    self._cv.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                blocks, self._pending = self._pending, []
                done = self._closed and not blocks
                self._cv.notify_all()  # room again for the teacher
            if done:
                return
            # One flush of the data and one of the flags per `burst` blocks (a backlog is not
            # one burst: flags keep coming). The kill hook commits block by block instead, to
            # die right after an exact unit.
            size = 1 if self._kill_after else self._burst
            for group in (blocks[i:i + size] for i in range(0, len(blocks), size)):
                if self._error is not None:
                    break
                try:
                    with self.writer.burst():
                        for block in group:
                            self._write(block)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self._error = err
                    break
                if self._kill_after and self._missing0 - len(self.writer.missing_units()) >= self._kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a killed job, right after a unit

    def _write(self, item: tuple[int, dict[str, Any]]) -> None:
        """Check and write a piece unit by unit: each unit's rows are checked, written and checksummed
        while they are in the CPU's cache, and the check's temporaries stay one unit large."""
        a, piece = item
        n = len(piece[fmt.SAMPLE_IDS])
        step = self.writer.meta.geometry.unit_samples
        lo = a
        while lo < a + n:
            hi = min(a + n, (lo // step + 1) * step)
            part = piece if (lo, hi) == (a, a + n) else slice_samples(piece, self.position_keys, a, lo, hi, self.cum)
            if self.on_nonfinite == "error" and not finite_rows({k: part[k] for k in self.position_keys}).all():
                self._refuse(a, piece)  # "record": written, listed at the end
            self.writer.write(lo, **part)
            lo = hi

    def _refuse(self, a: int, piece: dict[str, Any]) -> None:
        """Raise the error naming every sample of the piece with a non-finite stored value."""
        bad = np.flatnonzero(~finite_rows({k: piece[k] for k in self.position_keys}))
        lengths = None if self.cum is None else np.diff(self.cum[a:a + len(piece[fmt.SAMPLE_IDS]) + 1])
        ids = np.unique(sample_of_rows(piece[fmt.SAMPLE_IDS], bad, lengths))
        err = NonFiniteOutputs(
            f"the teacher produced non-finite logits (NaN/inf, or too large for the store dtype) for sample "
            f"ids {fmt.chunk_list(ids, 5)}; nothing was marked complete; fix the teacher or its inputs, or "
            "pass --on-nonfinite record to store them as they are")
        err.sample_ids = ids  # for a caller whose values did not come from a teacher (merge)
        raise err


def sample_of_rows(ids: np.ndarray, rows: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """Sample ids of per-position rows (rows are samples, except for ragged tokens: ``lengths`` maps them)."""
    if lengths is not None:
        return ids[np.searchsorted(np.cumsum(lengths), rows, side="right")]
    return ids[rows]


def unit_delay_hook() -> None:
    """Test hook: ``SOFTLABELS_TEST_DELAY_PER_UNIT`` seconds of sleep after each unit is computed."""
    delay = float(os.environ.get("SOFTLABELS_TEST_DELAY_PER_UNIT", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__
