"""Augmentations spelled as torchvision spells them, read as the ``--augment`` grammar's own terms.

``RandomResizedCrop(224, scale=(0.08, 1.0))``, ``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip()`` and ``RandomAffine(15, translate=(0.1, 0.1), scale=(0.9, 1.1))``
(optionally prefixed, ``T.RandomCrop``) become ``rrc(224,scale=0.08-1.0)``, ``crop(32,padding=4)``,
``flip(p=0.5)`` and ``affine(...)``: the same ops, so each view is replayable from its stored
parameters and a store records the canonical spelling. The term is parsed with :mod:`ast` and
its arguments read with ``ast.literal_eval`` (numbers, strings, tuples): nothing is evaluated.
Arguments without a replayable counterpart (``ColorJitter``, ``pad_if_needed``, ``interpolation=``
of a crop) are refused in one line.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from softlabels.errors import SpecError

__all__ = ["TORCHVISION_NAMES", "is_torchvision_term", "translate"]

# torchvision class -> (our op, its positional argument names in torchvision's order)
TORCHVISION_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "RandomCrop": ("crop", ("size", "padding", "pad_if_needed", "fill", "padding_mode")),
    "RandomHorizontalFlip": ("flip", ("p",)),
    "RandomResizedCrop": ("rrc", ("size", "scale", "ratio")),
    "RandomAffine": ("affine", ("degrees", "translate", "scale", "shear", "interpolation", "fill")),
}
_NOT_REPLAYABLE = ("ColorJitter", "RandomVerticalFlip", "RandomRotation", "RandomErasing", "GaussianBlur",
                   "RandomGrayscale", "RandAugment", "TrivialAugmentWide", "AutoAugment")
_HEAD = re.compile(r"\s*(?:[A-Za-z_]\w*\.)*(?P<name>[A-Z]\w*)\s*\(")


def is_torchvision_term(term: str) -> bool:
    """Whether ``term`` is spelled as a torchvision transform (a capitalised class called)."""
    m = _HEAD.match(term)
    return bool(m) and (m["name"] in TORCHVISION_NAMES or m["name"] in _NOT_REPLAYABLE)


def _fmt(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _value(op: str, key: str, value: Any, term: str) -> str | None:
    """One argument in the grammar's spelling (None: leave it at the op's default)."""
    if isinstance(value, (tuple, list)):
        if key == "size" and len(value) == 2:
            return f"{value[0]}x{value[1]}"
        if key == "translate" and len(value) == 2:
            return f"{_fmt(value[0])}x{_fmt(value[1])}"
        if key in ("scale", "ratio", "degrees") and len(value) == 2:
            return f"{_fmt(value[0])}-{_fmt(value[1])}"
        if key == "size" and len(value) == 1:
            return str(value[0])
        raise SpecError(f"'{term}': {key}={value!r} has no replayable counterpart here; pass one number or a pair "
                        "(docs/VIEWS.md)")
    if value is None or (key == "pad_if_needed" and value is False) or (key == "shear" and value in (0, None)):
        return None
    if key in ("pad_if_needed", "shear", "antialias") or (key == "interpolation" and op != "affine"):
        raise SpecError(f"'{term}': {key}={value!r} is not replayable from stored parameters here; drop it "
                        "(docs/VIEWS.md lists each op's arguments)")
    return _fmt(value)


def translate(term: str) -> str:
    """A torchvision-spelled term as the grammar's own term (e.g. ``crop(32,padding=4)``), or SpecError."""
    try:
        call = ast.parse(term.strip(), mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call):
        raise SpecError(f"cannot parse '{term}' as a torchvision transform; write e.g. RandomCrop(32, padding=4)")
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    if name not in TORCHVISION_NAMES:
        raise SpecError(f"{name} is not replayable from stored view parameters in softlabels (replayable: "
                        f"{', '.join(TORCHVISION_NAMES)}); apply it in the student's own transforms, or write "
                        "a package.module:factory op (docs/VIEWS.md)")
    op, names = TORCHVISION_NAMES[name]
    try:
        given = {names[i]: ast.literal_eval(a) for i, a in enumerate(call.args)}
        given.update({k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg})
    except (ValueError, IndexError, TypeError):
        raise SpecError(f"'{term}': arguments must be numbers, strings or tuples of them, at most "
                        f"{len(names)} by position") from None
    if unknown := [k for k in given if k not in names and k != "antialias"]:
        raise SpecError(f"'{term}' has no argument {unknown[0]!r}; {name} takes {', '.join(names)}")
    args = [f"{k}={v}" for k, value in given.items() if (v := _value(op, k, value, term)) is not None]
    first = f"{names[0]}="
    args = [a.removeprefix(first) if a.startswith(first) else a for a in args]
    args.sort(key=lambda a: "=" in a)  # the first argument by position, as the grammar wants it
    return f"{op}({','.join(args)})" if args else op
