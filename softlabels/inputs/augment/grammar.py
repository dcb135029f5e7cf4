"""The ``--augment`` grammar (docs/VIEWS.md): terms joined by ``+``, parsed without eval.

A term is a built-in op (``crop(32,padding=4)+flip``), the same op spelled as torchvision spells
it (``RandomCrop(32, padding=4)``, read with :mod:`ast` and ``ast.literal_eval`` only), or a
``package.module:factory`` called with no arguments that returns an
:class:`~softlabels.inputs.augment.compose.Augmentation`.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from typing import Any, Callable

from softlabels.errors import SpecError
from softlabels.inputs.augment.affine import RandomAffine
from softlabels.inputs.augment.compose import Augmentation, Compose
from softlabels.inputs.augment.crop import PADDING_MODES, RandomCrop, RandomHorizontalFlip
from softlabels.inputs.augment.resized_crop import RandomResizedCrop

__all__ = ["BUILTIN_OPS", "TORCHVISION_NAMES", "parse_augment"]

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(r"(?P<name>[A-Za-z_]\w*)\s*(?:\((?P<args>[^()]*)\))?")
_RANGE = re.compile(rf"({_NUMBER})-({_NUMBER})")
_PAIR = re.compile(rf"({_NUMBER})x({_NUMBER})")


class _Bad(ValueError):
    """A bad value inside one term; turned into a SpecError naming the term and the spec."""


def _float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise _Bad(f"'{v}' is not a number") from None
    if not math.isfinite(x):
        raise _Bad(f"'{v}' is not a finite number")
    return x


MAX_SIDE = 1 << 14
"""The largest view side and padding, in pixels: larger ones are typos or hostile (a crop of 1e8 pixels
a side would allocate 1e16 values per image), refused when parsed."""


def _int(v: str, low: int, high: int = MAX_SIDE) -> int:
    x = _float(v)
    if not x.is_integer() or x < low:
        raise _Bad(f"'{v}' is not a whole number >= {low}")
    if x > high:
        raise _Bad(f"'{v}' is over {high:,} pixels, the largest view side or padding")
    return int(x)


def _size(v: str) -> tuple[int, int]:
    m = _PAIR.fullmatch(v)
    return (_int(m[1], 1), _int(m[2], 1)) if m else (_int(v, 1),) * 2


def _range(v: str, symmetric: bool = False) -> tuple[float, float]:
    """``LO-HI``, or one number: ``(-x, x)`` when ``symmetric`` else ``(x, x)``."""
    m = _RANGE.fullmatch(v)
    if m:
        lo, hi = _float(m[1]), _float(m[2])
        if lo > hi:
            raise _Bad(f"range '{v}' runs backwards; write LOW-HIGH")
        return lo, hi
    x = _float(v)
    if symmetric and x < 0:
        raise _Bad(f"'{v}' is negative; give the largest angle, or a range LOW-HIGH")
    return (-x, x) if symmetric else (x, x)


def _pair(v: str) -> tuple[float, float]:
    m = _PAIR.fullmatch(v)
    return (_float(m[1]), _float(m[2])) if m else (_float(v),) * 2


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise _Bad(problem)


def _crop(size: str, padding: str = "0", fill: str = "0", padding_mode: str = "constant") -> RandomCrop:
    _check(padding_mode in PADDING_MODES, f"padding_mode '{padding_mode}' is not one of {', '.join(PADDING_MODES)}")
    return RandomCrop(_size(size), _int(padding, 0), _float(fill), padding_mode)


def _flip(p: str = "0.5") -> RandomHorizontalFlip:
    prob = _float(p)
    _check(0 <= prob <= 1, f"p={p} is not a probability in [0, 1]")
    return RandomHorizontalFlip(prob)


def _rrc(size: str, scale: str = "0.08-1", ratio: str = "") -> RandomResizedCrop:
    s = _range(scale)
    r = _range(ratio) if ratio else (3 / 4, 4 / 3)
    _check(0 < s[0], f"scale={scale} must be a range of area fractions > 0")
    _check(math.exp(-32) <= r[0] and r[1] <= math.exp(32), f"ratio={ratio} must be a range of aspect ratios > 0")
    return RandomResizedCrop(_size(size), s, r)


def _affine(degrees: str = "0", translate: str = "0", scale: str = "1", interpolation: str = "nearest",
            fill: str = "0") -> RandomAffine:
    t, s = _pair(translate), _range(scale)
    _check(all(0 <= v <= 1 for v in t), f"translate={translate} must be fractions of the size in [0, 1]")
    _check(s[0] > 0, f"scale={scale} must be > 0")
    _check(interpolation in ("nearest", "bilinear"), f"interpolation '{interpolation}' is not nearest or bilinear")
    return RandomAffine(_range(degrees, symmetric=True), t, s, interpolation, _float(fill))


BUILTIN_OPS: dict[str, Callable[..., Augmentation]] = {
    "crop": _crop, "flip": _flip, "rrc": _rrc, "affine": _affine,
}
"""Op name -> its builder, called with the term's arguments as text (the first one by position)."""


def _names(op: str) -> tuple[str, ...]:
    return tuple(inspect.signature(BUILTIN_OPS[op]).parameters)


def _builtin(term: str, spec: str) -> Augmentation:
    m = _TERM.fullmatch(term)
    if m is None:
        raise SpecError(f"cannot parse '{term}' in --augment '{spec}'; write NAME(ARG,KEY=VALUE,...) terms "
                        "joined by '+', e.g. crop(32,padding=4)+flip")
    name = m["name"]
    if name not in BUILTIN_OPS:
        raise SpecError(f"unknown augmentation '{name}' in --augment '{spec}'; use one of: "
                        f"{', '.join(BUILTIN_OPS)}, or package.module:factory")
    names = _names(name)
    kwargs: dict[str, str] = {}
    args = [a.strip() for a in m["args"].split(",")] if m["args"] and m["args"].strip() else []
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        key, value = (key.strip(), value.strip()) if eq else (names[0] if i == 0 else "", arg)
        if key not in names or key in kwargs:
            what = "repeats" if key in kwargs else "has no"
            raise SpecError(f"'{term}' in --augment '{spec}' {what} argument '{key or arg}'; "
                            f"{name} takes {names[0]} (first) and {', '.join(n + '=' for n in names[1:]) or 'no more'}")
        kwargs[key] = value
    return _build(name, kwargs, term, spec)


def _build(name: str, kwargs: dict[str, str], term: str, spec: str) -> Augmentation:
    """Built-in op ``name`` from its arguments as text; the term and the spec word the refusals."""
    try:
        return BUILTIN_OPS[name](**kwargs)
    except TypeError:  # the one required argument is missing
        raise SpecError(f"'{term}' in --augment '{spec}' lacks its {_names(name)[0]}; "
                        f"e.g. {name}(32)") from None
    except _Bad as err:
        raise SpecError(f"bad value in '{term}' of --augment '{spec}': {err}; see docs/VIEWS.md for its "
                        "arguments") from None


def _user(term: str, spec: str) -> Augmentation:
    from softlabels.inputs.spec import (
        _call_factory,  # the one place that imports user code
    )

    op: Any = _call_factory(term, "augmentation", ())  # always called: a class gives an instance
    missing = [a for a in ("num_params", "spec", "output_size", "draw", "apply") if not hasattr(op, a)]
    if missing or not isinstance(op.num_params, int) or op.num_params < 0:
        lacks = ", ".join(missing) if missing else f"an integer num_params (it has {op.num_params!r})"
        raise SpecError(f"augmentation factory '{term}' returned {type(op).__name__}, which lacks {lacks}; "
                        "return an object with num_params, spec, output_size, draw and apply (docs/VIEWS.md)")
    return op


def parse_augment(spec: str | list[str] | tuple[str, ...]) -> Compose:
    """Parse an ``--augment`` spec (docs/VIEWS.md) into a :class:`Compose`; ``spec`` may
    also be a list of terms. ``parse_augment(c.spec) == c`` for built-in ops: ``spec`` is the
    canonical text."""
    if isinstance(spec, (list, tuple)):
        spec = "+".join(str(t) for t in spec)
    terms = [t.strip() for t in spec.split("+")]
    if not spec.strip() or not all(terms):
        raise SpecError(f"--augment '{spec}' has an empty term; join ops with one '+', e.g. crop(32,padding=4)+flip")
    return Compose([_torchvision(t, spec) if _is_torchvision(t) else _user(t, spec) if ":" in t
                    else _builtin(t, spec) for t in terms])


# -- terms spelled as torchvision spells them ---------------------------------------------------

TORCHVISION_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "RandomCrop": ("crop", ("size", "padding", "pad_if_needed", "fill", "padding_mode")),
    "RandomHorizontalFlip": ("flip", ("p",)),
    "RandomResizedCrop": ("rrc", ("size", "scale", "ratio")),
    "RandomAffine": ("affine", ("degrees", "translate", "scale", "shear", "interpolation", "fill")),
}
"""torchvision class -> (our op, its positional argument names in torchvision's order)."""
_NOT_REPLAYABLE = ("ColorJitter", "RandomVerticalFlip", "RandomRotation", "RandomErasing",
                   "GaussianBlur", "RandomGrayscale", "RandAugment", "TrivialAugmentWide",
                   "AutoAugment")
_HEAD = re.compile(r"\s*(?:[A-Za-z_]\w*\.)*(?P<name>[A-Z]\w*)\s*\(")


def _is_torchvision(term: str) -> bool:
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
        raise SpecError(f"'{term}': {key}={value!r} has no replayable counterpart here; pass one "
                        "number or a pair (docs/VIEWS.md)")
    if value is None or (key == "pad_if_needed" and value is False) or (key, value) == ("shear", 0):
        return None
    cropping = key == "interpolation" and op != "affine"  # a crop's interpolation: not replayable
    if key in ("pad_if_needed", "shear", "antialias") or cropping:
        raise SpecError(f"'{term}': {key}={value!r} is not replayable from stored parameters here; "
                        "drop it (docs/VIEWS.md lists each op's arguments)")
    return _fmt(value)


def _torchvision(term: str, spec: str) -> Augmentation:
    """A torchvision-spelled term as the grammar's own op (e.g. ``crop(32,padding=4)``), or
    SpecError."""
    try:
        call = ast.parse(term.strip(), mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call):
        raise SpecError(f"cannot parse '{term}' as a torchvision transform; "
                        "write e.g. RandomCrop(32, padding=4)")
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    if name not in TORCHVISION_NAMES:
        raise SpecError(f"{name} is not replayable from stored view parameters in softlabels "
                        f"(replayable: {', '.join(TORCHVISION_NAMES)}); apply it in the student's "
                        "own transforms, or write a package.module:factory op (docs/VIEWS.md)")
    op, names = TORCHVISION_NAMES[name]
    try:
        given = {names[i]: ast.literal_eval(a) for i, a in enumerate(call.args)}
        given.update({k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg})
    except (ValueError, IndexError, TypeError):
        raise SpecError(f"'{term}': arguments must be numbers, strings or tuples of them, at most "
                        f"{len(names)} by position") from None
    if unknown := [k for k in given if k not in names and k != "antialias"]:
        raise SpecError(f"'{term}' has no argument {unknown[0]!r}; {name} takes {', '.join(names)}")
    kwargs = {k: v for k, value in given.items() if (v := _value(op, k, value, term)) is not None}
    return _build(op, kwargs, term, spec)
