"""SIGTERM and SIGINT as Ctrl-C, without losing one.

A scheduler's stop (SIGTERM) takes the Ctrl-C path: ``KeyboardInterrupt`` in the
main thread, so finished units or epochs are kept, locks released, DataLoader
workers joined, and the command prints one line. Python delivers a signal by
raising from whatever bytecode runs next, and some code swallows what it raises
(a C extension's module init during a lazy import, seen with ``numpy.random``), so
the handler also records the signal, and the job loops call :func:`check` once
per batch or step to raise it again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["check", "stop_signals_as_ctrl_c"]

_pending = False
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: object) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a stop signal came (its first raise may have been lost)."""
    if _pending:
        raise KeyboardInterrupt


@contextmanager
def stop_signals_as_ctrl_c() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise ``KeyboardInterrupt`` (main thread only; elsewhere a no-op)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return
    old = {s: signal.signal(s, _interrupt) for s in _SIGNALS}
    _pending = False
    try:
        yield
    finally:
        _pending = False
        for s, handler in old.items():
            signal.signal(s, handler)
