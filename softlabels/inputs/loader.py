"""DataLoader transport for batch datasets: batches cross from workers through a ring of shared
memory, in the order of a plain ``DataLoader(ds, batch_size=None)``, and a worker's exception
comes back as one line (docs/ARCHITECTURE.md, "Data flow", says why and how).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from softlabels.errors import DataError, SoftLabelsError, one_line

__all__ = ["batch_loader"]

MESSAGE_BYTES = 4 << 20  # batches per message: up to ~4 MiB, at most MESSAGE_BATCHES
MESSAGE_BATCHES = 16
SLOT_BYTES = 2 * MESSAGE_BYTES  # a message is cut once it reaches MESSAGE_BYTES: most fit a slot
_ALIGN = 64


def batch_loader(dataset: Dataset, *, num_workers: int, pin_memory: bool = False, sampler: Iterable | None = None,
                 prefetch_factor: int | None = None) -> Iterable:
    """Iterate ``dataset``'s items (already batches), in-process or through ``num_workers`` workers.

    Equivalent to ``DataLoader(dataset, batch_size=None, ...)`` in what it yields.
    """
    if num_workers == 0:
        return DataLoader(dataset, batch_size=None, sampler=sampler, pin_memory=pin_memory)
    return _Loader(dataset, num_workers, pin_memory, sampler, prefetch_factor)


class _Loader:
    def __init__(self, dataset: Dataset, workers: int, pin_memory: bool, sampler: Iterable | None,
                 prefetch_factor: int | None) -> None:
        self.dataset, self.workers, self.sampler = dataset, workers, sampler
        self.pin_memory, self.prefetch = pin_memory, prefetch_factor or 2
        self._live: _Live | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        options = {"num_workers": self.workers, "prefetch_factor": self.prefetch}  # pinning: see _Ring.take
        if isinstance(self.dataset, IterableDataset) and hasattr(self.dataset, "worker_state"):
            return self._persistent(options)
        ring = _Ring(self.workers, self.prefetch + 2, self.pin_memory)
        if isinstance(self.dataset, IterableDataset):
            loader = DataLoader(_PackedStream(self.dataset, ring), batch_size=None, **options)
            return _round_robin(iter(loader), self.workers, ring)
        sampler = self.sampler if self.sampler is not None else range(len(self.dataset))  # type: ignore[arg-type]
        loader = DataLoader(_PackedItems(self.dataset, ring), batch_size=None, sampler=sampler, **options)
        return (ring.take(message)[2][0] for message in loader)

    def _persistent(self, options: dict[str, Any]) -> Iterator:
        """One epoch from workers kept alive across epochs: starting them anew cost as much as a small epoch
        (fork, DataLoader start-up, the store opened again). The dataset's ``worker_state()`` (a few ints:
        epoch, seed, resume point) travels to the workers' copies through shared memory before each epoch.
        After an epoch that was not read to its end, slots may still be taken: the workers start anew."""
        live = self._live
        if live is None or not live.finished:
            self._live = None  # the old workers, if any, exit when their DataLoader goes
            ring = _Ring(self.workers, self.prefetch + 2, self.pin_memory)
            state = torch.zeros(_STATE_INTS, dtype=torch.int64).share_memory_()
            loader = DataLoader(_PackedStream(self.dataset, ring, state), batch_size=None,
                                persistent_workers=True, **options)
            live = self._live = _Live(loader, ring, state)
        values = [int(v) for v in self.dataset.worker_state()]  # type: ignore[attr-defined]
        live.state[:len(values) + 1] = torch.tensor([len(values), *values])
        live.finished = False
        return live.epoch(self.workers)


class _Ring:
    """``slots`` shared-memory message slots per worker, and their busy flags (set by the worker, cleared here)."""

    def __init__(self, workers: int, slots: int, pin_memory: bool) -> None:
        self.slots, self.pin_memory = slots, pin_memory
        # mapped now, before the workers fork; pages are only touched (and faulted in) once used
        self.data = _shared(workers * slots * SLOT_BYTES)
        self.busy = torch.zeros(workers, slots, dtype=torch.uint8).share_memory_()
        self.sent = 0  # messages this worker process has sent (each worker has its own copy)
        self.parent = os.getpid()

    def put(self, worker: int, items: list[Any]) -> tuple[int, bool, Any]:
        """Worker side: pack ``items`` into the worker's next slot (or a fresh tensor when too large)."""
        tensors: list[torch.Tensor] = []
        template = [_template(item, tensors) for item in items]
        offsets, total = _offsets(tensors)
        if total > SLOT_BYTES:
            buf, where = _shared(total), None
        else:
            k = self.sent % self.slots
            self.sent += 1
            while self.busy[worker, k]:  # freed when the main process took the message `slots` ago
                if os.getppid() != self.parent:
                    raise SystemExit(0)  # the main process is gone
                time.sleep(0.0002)
            base = (worker * self.slots + k) * SLOT_BYTES
            buf, where = self.data[base:base + total], (worker, k)
        specs = []
        for t, off in zip(tensors, offsets):
            t = t.detach().cpu()
            buf[off:off + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
            specs.append((off, t.dtype, tuple(t.shape)))
        if where is not None:
            self.busy[where[0], where[1]] = 1
            buf = None
        return worker, False, (where, total, buf, template, specs)

    def take(self, message: tuple[int, bool, Any]) -> tuple[int, bool, list[Any]]:
        """Main side: the message's items, copied out of their slot (which is then free again)."""
        worker, last, payload = message
        if isinstance(payload, _Failure):
            raise payload.cls(payload.message)
        where, total, buf, template, specs = payload
        if where is not None:
            base = (where[0] * self.slots + where[1]) * SLOT_BYTES
            buf = torch.empty(total, dtype=torch.uint8, pin_memory=self.pin_memory)
            buf.copy_(self.data[base:base + total])
            self.busy[where[0], where[1]] = 0
        elif self.pin_memory:
            buf = buf.pin_memory()
        views = [buf[off:off + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
                 for off, dtype, shape in specs]
        return worker, last, [_walk(item, lambda v: views[v.index] if isinstance(v, _Slot) else v) for item in template]


@dataclass
class _Failure:
    """An error raised in a worker, as a class and one line (no traceback crosses the process)."""

    cls: type
    message: str

    @classmethod
    def of(cls, err: Exception) -> _Failure:
        if isinstance(err, SoftLabelsError):
            return cls(type(err), str(err))
        return cls(DataError, f"a DataLoader worker failed: {one_line(err, 500)}; fix the dataset, or "
                              "rerun with --num-workers 0 to see where it is raised")


_STATE_INTS = 16  # a count, then the dataset's worker_state()


@dataclass
class _Live:
    """Persistent workers, their ring and the shared state each epoch starts from."""

    loader: DataLoader
    ring: _Ring
    state: torch.Tensor
    finished: bool = True

    def epoch(self, workers: int) -> Iterator[Any]:
        yield from _round_robin(iter(self.loader), workers, self.ring)
        self.finished = True  # every message taken: every slot is free again


class _PackedStream(IterableDataset):
    """Worker side of an iterable dataset: ``(worker, last, packed batches)`` messages."""

    def __init__(self, dataset: IterableDataset, ring: _Ring, state: torch.Tensor | None = None) -> None:
        self.dataset, self.ring, self.state = dataset, ring, state

    def __iter__(self) -> Iterator[tuple[int, bool, Any]]:
        worker = get_worker_info().id
        if self.state is not None:  # persistent workers: this epoch's state, set by the main process
            n = int(self.state[0])
            self.dataset.set_worker_state(tuple(int(v) for v in self.state[1:n + 1]))  # type: ignore[attr-defined]
        group: list[Any] = []
        size, most = 0, 1  # the first message holds one batch, then twice as many up to MESSAGE_BATCHES:
        try:  # the loop starts after one batch, not sixteen
            for batch in self.dataset:
                group.append(batch)
                size += _nbytes(batch)
                if size >= MESSAGE_BYTES or len(group) >= most:
                    yield self.ring.put(worker, group)
                    group, size, most = [], 0, min(2 * most, MESSAGE_BATCHES)
            message = self.ring.put(worker, group)
        except Exception as err:  # noqa: BLE001 - sent to the main process as one line
            yield worker, True, _Failure.of(err)
            return
        yield message[0], True, message[2]


class _PackedItems(Dataset):
    """Worker side of a map-style dataset: each item packed into one tensor, errors as messages."""

    def __init__(self, dataset: Dataset, ring: _Ring) -> None:
        self.dataset, self.ring = dataset, ring

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> tuple[int, bool, Any]:
        try:
            return self.ring.put(get_worker_info().id, [self.dataset[index]])
        except Exception as err:  # noqa: BLE001 - sent to the main process as one line
            return 0, True, _Failure.of(err)


def _round_robin(messages: Iterator, workers: int, ring: _Ring) -> Iterator[Any]:
    """Batches in the order a DataLoader gives one-batch items: worker 0, 1, ..., skipping finished ones."""
    queues: list[deque] = [deque() for _ in range(workers)]
    ended = [False] * workers
    w = 0
    while any(q or not e for q, e in zip(queues, ended)):
        while not queues[w] and not ended[w]:
            message = next(messages, None)
            if message is None:  # the loader stopped: every worker has finished
                ended = [True] * workers
                break
            worker, last, batches = ring.take(message)
            queues[worker].extend(batches)
            ended[worker] = ended[worker] or last
        if queues[w]:
            yield queues[w].popleft()
        w = (w + 1) % workers


# -- packing: any nest of dicts, tuples and lists of tensors and plain values ---------------
def _walk(item: Any, leaf: Callable[[Any], Any]) -> Any:
    """``item`` rebuilt with ``leaf`` applied to each value that is no dict, tuple or list."""
    if isinstance(item, dict):
        return {k: _walk(v, leaf) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(_walk(v, leaf) for v in item)
    return leaf(item)


def _template(item: Any, tensors: list[torch.Tensor]) -> Any:
    """``item`` with each tensor appended to ``tensors`` and replaced by its :class:`_Slot`."""
    def slot(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    return _walk(item, slot)


def _nbytes(item: Any) -> int:
    tensors: list[torch.Tensor] = []
    _template(item, tensors)
    return sum(t.nbytes for t in tensors)


def _offsets(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.nbytes // _ALIGN) * _ALIGN
    return offsets, total


def _shared(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in shared memory from the start (sending it later copies nothing)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)))


@dataclass(frozen=True)
class _Slot:
    index: int
