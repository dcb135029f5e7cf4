"""SIGTERM and SIGINT as Ctrl-C, without losing one, from the first import on (docs/ARCHITECTURE.md,
Process plumbing).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["begin", "check", "end", "stop_signals_as_ctrl_c"]

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


def _starting(signum: int, frame: object) -> None:
    sys.stderr.write("error: interrupted while starting; nothing was done, rerun the command\n")
    sys.stderr.flush()
    os._exit(2)  # mid-import: nothing to clean up, and unwinding would print the import's traceback


def begin() -> None:
    """Ctrl-C while the command line starts: one line and exit 2 (only when started as ``softlabels``)."""
    argv = getattr(sys, "argv", None) or [""]
    # "-m" while the package itself is imported: "python -m softlabels"; else the console script
    as_cli = argv[0] == "-m" or os.path.basename(argv[0]) in ("softlabels", "softlabels.exe")
    if as_cli and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _starting)


def end() -> None:
    """Back to Python's KeyboardInterrupt, which the CLI turns into its own one-line hint."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
