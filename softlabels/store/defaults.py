"""The distillation temperature and hard-label weight a store is trained at when none is given.

One source for the trainer, ``merge`` and the command line's help. Imports nothing, so the
command line's ``--help`` stays light.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ALPHA", "DEFAULT_TEMPERATURE"]

DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 0.5
