"""Where a command writes must not be what it reads: ``--out`` against the inputs.

Compared by real path (symlinks resolved), so a second name for a file or folder
is caught too. ``--overwrite`` never lifts this: it replaces a previous output,
never an input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["out_overlaps"]


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


def out_overlaps(out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | None]], *,
                 writes: tuple[str, ...] | None = None) -> str | None:
    """The problem with ``out`` given ``(flag, path)`` inputs, or None.

    ``out`` may not be an input or lie inside one. An input inside ``out`` is refused
    when the command may replace it: anything in it (``writes=None``, a store replaced
    whole), or only the listed top-level names (a run directory's own files).
    """
    o = _real(out)
    for flag, path in inputs:
        if not path:
            continue
        i = _real(path)
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
