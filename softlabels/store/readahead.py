"""Read-ahead for stores on high-latency storage: the units the next batches need, read on a few threads
(docs/SCALE.md, "Read-ahead")."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from softlabels.store.format import env_int
from softlabels.store.location import is_url

__all__ = ["ReadAhead"]


class ReadAhead:
    """Wraps a dataset's ``load(g, out=None)`` and its batches ``(units, rows)`` (docs/SCALE.md)."""

    def __init__(self, load: Callable[..., dict[str, np.ndarray]], depth: int) -> None:
        self._load, self.depth = load, depth
        self._pool = ThreadPoolExecutor(max_workers=min(depth, 4), thread_name_prefix="softlabels-read")
        self._futures: dict[int, Future] = {}
        self._seen: set[int] = set()  # units met in the batches so far: each is read ahead once, when first met

    @classmethod
    def for_stores(cls, stores: Iterable[Any], load: Callable[..., dict[str, np.ndarray]]) -> ReadAhead | None:
        """A read-ahead when any store lies at a URL and the depth is > 0, else None (read as before)."""
        depth = env_int("SOFTLABELS_READ_AHEAD", 4, low=0)
        if depth <= 0 or not any(is_url(getattr(s, "path", None)) for s in stores):
            return None
        return cls(load, depth)

    def batches(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The same batches, in order, with the reads of their units started ahead."""
        source, ahead = iter(batches), deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(self._futures) < self.depth and len(ahead) < 64 * self.depth:
                    try:
                        batch = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    ahead.append(batch)
                    units = np.asarray(batch[0])
                    for g in units[np.sort(np.unique(units, return_index=True)[1])].tolist():
                        if g not in self._seen:  # later batches of a unit find it in the dataset's window
                            self._seen.add(g)
                            self._futures[g] = self._pool.submit(self._load, g)
                if not ahead:
                    return
                yield ahead.popleft()
        finally:
            self.close()

    def load(self, g: int, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Unit ``g``'s rows: the read started ahead if any (the caller copies them where it wants), else read now."""
        future = self._futures.pop(g, None)
        if future is not None:
            return future.result()
        return self._load(g, out=out) if out is not None else self._load(g)

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
