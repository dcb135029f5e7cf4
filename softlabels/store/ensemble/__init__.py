"""Ensembles of teachers: combined targets (:mod:`.combine`) and stores read as one (:mod:`.store`).

See docs/ENSEMBLES.md for the rules and what each layout's combination is.
"""

from softlabels.store.ensemble.combination import (
    MODES,
    Combination,
    check_member,
    check_temperature,
    combine,
)
from softlabels.store.ensemble.reader import EnsembleStore

__all__ = ["MODES", "Combination", "check_member", "check_temperature", "combine", "EnsembleStore"]
