"""Ctrl-C while the command line starts (importing torch takes seconds) is one line, not a traceback.

The package's ``__init__`` imports the whole library, and it runs before the CLI module
can catch anything; so, only when the process was started as the ``softlabels`` command,
a SIGINT handler is installed first and the CLI's own handling replaces it once a
command starts (:func:`end`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

MESSAGE = "error: interrupted while starting; nothing was done, rerun the command\n"


def _interrupted(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    sys.stderr.write(MESSAGE)
    sys.stderr.flush()
    os._exit(2)  # mid-import: nothing to clean up, and unwinding would print the import's traceback


def _started_as_cli() -> bool:
    argv = getattr(sys, "argv", None) or [""]
    # "-m" while the package itself is imported: "python -m softlabels"; else the console script
    return argv[0] == "-m" or os.path.basename(argv[0]) in ("softlabels", "softlabels.exe")


def begin() -> None:
    if _started_as_cli() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupted)


def end() -> None:
    """Back to Python's KeyboardInterrupt, which the CLI turns into its own one-line hint."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
