"""Progress of long commands: a tqdm bar on a terminal (or when asked for), else a plain line every
:data:`LINE_EVERY_S` seconds, since a bar's carriage returns make one ever-growing line in a log.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

__all__ = ["LINE_EVERY_S", "Lines", "progress_bar", "wants_bar"]

LINE_EVERY_S = 30.0


def wants_bar(show: bool | None) -> bool:
    """``show``: True a bar, False none, None a bar only when stderr is a terminal."""
    return show if show is not None else sys.stderr.isatty()


class Lines:
    """The part of tqdm's interface the commands use, reporting one line every LINE_EVERY_S seconds."""

    def __init__(self, total: int, desc: str, unit: str, say: Callable[[str], None]) -> None:
        self.total, self.desc, self.unit, self.say = total, desc, unit, say
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LINE_EVERY_S:
            self.last = now
            pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            rate = self.n / (now - self.t0)
            self.say(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}{pct}, {rate:,.1f} {self.unit}/s, "
                     f"{now - self.t0:.0f} s{self.postfix}")

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(*, total: int, desc: str, unit: str, show: bool | None, say: Callable[[str], None], **bar: Any):
    """A tqdm bar (``bar``: more tqdm options) when :func:`wants_bar`, else :class:`Lines` via ``say``."""
    if wants_bar(show):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **bar)
    return Lines(total, desc, unit, say)
