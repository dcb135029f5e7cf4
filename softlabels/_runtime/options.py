"""Options every command shares (device, threads): help texts and checks. Imports nothing.
"""

from __future__ import annotations

from typing import Any

DEVICE_HELP = "Device to run on: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N."
THREADS_HELP = ("CPU threads torch may use in this process (0: torch's own default, one per core). One is "
                "fastest for small models, above all on a busy machine, and gives the same bits on every machine.")


def threads_problem(threads: Any) -> list[str]:
    return count_problems({"threads": threads}, 0)


def count_problems(values: dict[str, Any], minimum: int) -> list[str]:
    """``--name must be an integer >= minimum`` for each of ``values`` (option name -> value) that is not one."""
    return [f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {v!r}" for name, v in values.items()
            if not (isinstance(v, int) and v >= minimum)]
