"""The distillation temperature and hard-label weight a store is trained at when none is given.

One source for the trainer, ``merge`` and the command line's help: dense classifier stores
(``sample``/``views`` positions) train at :data:`DEFAULT_TEMPERATURE` and :data:`DEFAULT_ALPHA` (the
demo's sweep); token stores and sparse layouts at the T the store answers exactly (1 when it answers
1, else the smallest it answers) and :data:`SPARSE_ALPHA` (docs/EXPERIMENTS.md, "Temperatures of
sparse stores"). Imports nothing, so the command line's ``--help`` stays light.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ALPHA", "DEFAULT_TEMPERATURE", "SPARSE_ALPHA", "choose", "default_temperature",
           "default_alpha"]

DEFAULT_TEMPERATURE = 2.0
"""T for dense classifier stores (and an online teacher)."""
DEFAULT_ALPHA = 0.5
"""alpha for dense classifier stores (and an online teacher)."""
SPARSE_ALPHA = 0.5
"""alpha for token stores and sparse layouts: at T = 1, half hard CE beat the soft loss alone for
top-k (held-out loss 4.63 vs 5.07) and sampled (4.58 vs 4.61) students (docs/EXPERIMENTS.md)."""


def _sparse(layout: str | None, positions: str | None) -> bool:
    return layout in ("topk", "sampled") or positions == "tokens"


def default_temperature(layout: str | None, positions: str | None, supported: tuple[float, ...] | None) -> float:
    """T for a store of this layout and position kind answering ``supported`` (``None``: every T)."""
    if not _sparse(layout, positions):
        return DEFAULT_TEMPERATURE if supported is None or DEFAULT_TEMPERATURE in supported else supported[0]
    if supported is None or any(abs(t - 1.0) < 1e-9 for t in supported):
        return 1.0
    return float(supported[0])


def default_alpha(layout: str | None, positions: str | None) -> float:
    """alpha for a store of this layout and position kind."""
    return SPARSE_ALPHA if _sparse(layout, positions) else DEFAULT_ALPHA


def choose(temperature: float | None, alpha: float | None, *, layout: str | None, positions: str | None,
           supported: tuple[float, ...] | None) -> tuple[float, float, str | None]:
    """(T, alpha, a line saying what was chosen, or None when both were given)."""
    t = default_temperature(layout, positions, supported) if temperature is None else float(temperature)
    a = default_alpha(layout, positions) if alpha is None else float(alpha)
    if temperature is not None and alpha is not None:
        return t, a, None
    chosen = [f"T = {t:g}" if temperature is None else "", f"alpha = {a:g}" if alpha is None else ""]
    kind = f"a {layout} {positions} store" if layout else "an online teacher"
    return t, a, (f"{' and '.join(c for c in chosen if c)}: the default for {kind} "
                  "(docs/EXPERIMENTS.md); pass --temperature / --alpha to choose")
