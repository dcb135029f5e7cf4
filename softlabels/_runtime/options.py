"""Options every command shares (device, threads): help texts and the bound checks of every config.
"""

from __future__ import annotations

import math
from typing import Any

DEVICE_HELP = "Device to run on: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N."
THREADS_HELP = ("CPU threads torch may use in this process (0: torch's own default, one per core). One is "
                "fastest for small models, above all on a busy machine, and gives the same bits on every machine.")


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_WITHIN = {">=": lambda v, low: _integer(v) and v >= low,  # generate's wording of the integer kind
           "an integer >=": lambda v, low: _integer(v) and v >= low,
           "a number >": lambda v, low: is_number(v) and v > low,
           "a number >=": lambda v, low: is_number(v) and v >= low}


def bound_problems(kind: str, low: int, values: dict[str, Any], optional: bool = False) -> list[str]:
    """``--name must be <kind> <low>, got <value>`` for each of ``values`` (option name -> value)
    out of bounds; ``kind`` is a key of :data:`_WITHIN` (a number: a finite one; never a bool).
    ``optional``: a value of None (not given) passes."""
    return [f"--{name.replace('_', '-')} must be {kind} {low}, got {v!r}"
            for name, v in values.items() if not (optional and v is None or _WITHIN[kind](v, low))]
