"""Which distillation temperatures a store answers exactly (docs/LAYOUTS.md; a merged arithmetic
store: the T it was combined at), and the one check, :func:`require_temperature`, that refuses the rest.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

from softlabels.errors import ConfigError

__all__ = ["DEFAULT_TAIL_TEMPERATURES", "TAIL_T_RANGE", "parse_grid", "grid_problems", "require_temperature", "supports",
           "format_grid", "intersect"]

DEFAULT_TAIL_TEMPERATURES = (1.0, 2.0, 4.0)
"""The top-k tail grid ``generate`` records when ``--tail-temperatures`` is not given."""

TAIL_T_RANGE = (0.01, 1000.0)
"""The bounds of a recorded T (tail grid, draw T): z / T and its logsumexp stay finite in float32 for every
float16 logit."""

_REGENERATE = {
    "topk": "regenerate it with 'softlabels generate --layout topk --tail-temperatures {grid}'",
    "topk-legacy": "regenerate it with 'softlabels generate --layout topk --tail-temperatures {grid}' (it was "
                   "written before top-k stores recorded their tails per temperature)",
    "sampled": "regenerate it with 'softlabels generate --layout sampled --sample-temperature {t}'",
    "ensemble": "merge again with 'softlabels merge --temperature {t}'",
}


def format_grid(grid: Iterable[float]) -> str:
    """``1, 2, 4``: temperatures as the messages and the CLI write them."""
    return ", ".join(f"{float(t):g}" for t in grid)


def grid_problems(grid: object, what: str = "--tail-temperatures") -> list[str]:
    """Every problem with a temperature grid: a non-empty list of numbers in ``TAIL_T_RANGE``, ascending, no repeats."""
    if not isinstance(grid, (list, tuple)) or not grid:
        return [f"{what} must be a non-empty list of temperatures, got {grid!r}"]
    if not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in grid):
        return [f"{what} must hold numbers, got {list(grid)!r}"]
    if not all(TAIL_T_RANGE[0] <= t <= TAIL_T_RANGE[1] for t in grid):  # before float(): 10**400 overflows it
        shown = ", ".join("an integer over 1e300" if isinstance(t, int) and abs(t) > 1e300 else f"{t:g}"
                          for t in grid)
        return [f"{what} must hold temperatures between {TAIL_T_RANGE[0]:g} and {TAIL_T_RANGE[1]:g}, got "
                f"{shown}; pass e.g. 1,2,4"]
    values = [float(t) for t in grid]
    if len(set(values)) != len(values):
        return [f"{what} names a temperature twice ({format_grid(values)}); pass each once, e.g. 1,2,4"]
    if values != sorted(values):
        return [f"{what} must be in ascending order, got {format_grid(values)}; pass e.g. 1,2,4"]
    return []


def parse_grid(text: str, what: str = "--tail-temperatures") -> tuple[float, ...]:
    """``"1,2,4"`` -> (1.0, 2.0, 4.0); sorted, every problem refused in one line."""
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers such as 1,2,4, got {text!r}") from None
    values = sorted(values) if all(math.isfinite(v) for v in values) else values
    if problems := grid_problems(values, what):
        raise ConfigError(problems)
    return tuple(values)


def supports(supported: tuple[float, ...] | None, temperature: float) -> bool:
    """Whether ``temperature`` is one the store answers (equal to a grid T up to float rounding)."""
    return supported is None or any(math.isclose(float(temperature), t, rel_tol=1e-6) for t in supported)


def intersect(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """The temperatures both answer (``None`` = any)."""
    if a is None or b is None:
        return b if a is None else a
    return tuple(t for t in a if supports(b, t))


def require_temperature(supported: tuple[float, ...] | None, temperature: float, where: str, kind: str,
                        option: str = "--temperature ") -> None:
    """Refuse, in one line, a T the store (or target) ``where`` does not answer exactly.

    ``kind`` says why and how to get T: ``topk`` (a tail grid), ``topk-legacy`` (T = 1 only),
    ``sampled`` (its draw temperature), ``ensemble`` (a merged arithmetic store). ``option`` is how
    the caller passes T (the CLI's ``--temperature ``, the library's ``temperature=``).
    """
    if supports(supported, temperature):
        return
    t = float(temperature)
    grid = sorted(set(supported or ()) | {t})
    why = {"sampled": "was drawn at", "ensemble": "was combined at"}.get(kind, "records its top-k tails at")
    fix = _REGENERATE.get(kind, _REGENERATE["topk"]).format(grid=",".join(f"{x:g}" for x in grid), t=f"{t:g}")
    have = [f"{x:g}" for x in supported or ()]
    choice = have[0] if len(have) == 1 else f"{', '.join(have[:-1])} or {have[-1]}"
    raise ConfigError(f"{where} {why} T = {', '.join(have)} and answers only {'that T' if len(have) == 1 else 'those'} "
                      f"exactly, not T = {t:g}; pass {option}{choice}, or {fix}")
