"""Where a command writes must not be what it reads: ``--out`` against the inputs, by real path
(symlinks resolved) or a URL's text; ``--overwrite`` never lifts this (E1007, E1008).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import PurePosixPath

__all__ = ["is_url", "out_overlaps", "resolved"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: object) -> bool:
    """Whether ``path`` names a remote location: a ``scheme://`` other than ``file://``."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.lower().startswith("file://")


def resolved(path: str | os.PathLike[str]) -> str:
    """A path made absolute (symlinks resolved) to record it, or a URL as it is (``file://`` as its path)."""
    if is_url(path):
        return str(path).rstrip("/")
    if isinstance(path, str) and path.lower().startswith("file://"):
        path = path[len("file://"):]
    return os.path.realpath(path)


def _real(path: str | os.PathLike[str]) -> PurePosixPath:
    text = resolved(path)
    return PurePosixPath(text.replace("://", "/", 1) if is_url(text) else text)


def out_overlaps(out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | None]], *,
                 writes: tuple[str, ...] | None = None) -> str | None:
    """The problem with ``out`` given ``(flag, path)`` inputs, or None: ``out`` may not be or lie
    inside an input, nor hold one it may replace (any, or only the top-level names ``writes``)."""
    o = _real(out)
    for flag, path in inputs:
        if not path:
            continue
        i = _real(path)
        if is_url(str(out)) != is_url(str(path)):
            continue
        if o == i:
            how = "is"
        elif i in o.parents:
            how = "lies inside"
        elif o in i.parents and (writes is None or i.relative_to(o).parts[0] in writes):
            how = "holds"
        else:
            continue
        return (f"--out {str(out)!r} {how} the input {flag} {path!r}; choose another --out "
                "(an input is never overwritten, not even with --overwrite)")
    return None
