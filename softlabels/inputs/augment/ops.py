"""Built-in augmentation ops, applied to whole batches, and :class:`Compose`.

Every op draws a fixed number of float32 parameters per view and replays them
exactly: ``apply(x, params)`` is a pure function of its arguments, vectorised over
the batch (each row its own parameters, no per-item Python loop). The parameters
are what torchvision's transforms draw internally, so the same numbers passed to
``torchvision.transforms.v2.functional`` give the same image (``tests/test_augment.py``).

Draws use only exact float64 operations (``+ - * /``, sqrt, floor, round and the
series in :func:`_exp`), never a library ``exp``/``log`` whose last bit may differ
between devices or between the vectorised body and the tail of a CPU kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from softlabels.errors import DataError
from softlabels.inputs.augment.rng import ViewRandom

__all__ = ["PARAM_DTYPES", "Augmentation", "Compose", "RandomAffine", "RandomCrop", "RandomHorizontalFlip",
           "RandomResizedCrop", "param_dtype"]

Size = tuple[int, int]
PADDING_MODES = ("constant", "edge", "reflect")  # torchvision's names

PARAM_DTYPES = ("uint8", "float16", "float32")
"""Storage dtypes of ``view_params``, narrowest first: whole numbers in 0..255; whole numbers
of magnitude <= 2048 and float16 values; anything (float32, what an op's ``draw`` returns)."""


def _int_dtype(low: float, high: float) -> str:
    """The narrowest of :data:`PARAM_DTYPES` that holds every whole number in ``[low, high]`` exactly."""
    if low >= 0 and high <= 255:
        return "uint8"
    return "float16" if max(-low, high) <= 2048 else "float32"


def param_dtype(op: Augmentation, size: Size) -> str:
    """The narrowest dtype that holds every parameter ``op`` draws for inputs of ``size`` exactly.

    An op says so with a ``param_dtype(size)`` method (every built-in op has one); an op
    without one (a user op) gets float32, which holds whatever ``draw`` returns.
    """
    own = getattr(op, "param_dtype", None)
    dtype = str(own(size)) if callable(own) else "float32"
    if dtype not in PARAM_DTYPES:
        raise DataError(f"augmentation '{op.spec}' says its params are {dtype!r}, not one of "
                        f"{', '.join(PARAM_DTYPES)}; return one of those from param_dtype()")
    return dtype


def _half_within(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` rounded to float16 values (as float32), kept in ``[low, high]`` where the range holds one.

    Round to nearest, then one float16 step back inside where that crossed an end (the step
    is done on the bits, the same on every device).
    """
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    neg = bits < 0  # sign-magnitude: a step towards -inf grows a negative number's bits
    down = torch.where(neg, bits + 1, bits - 1).view(torch.float16)
    up = torch.where(neg, bits - 1, bits + 1).view(torch.float16)
    hd = h.double()
    h = torch.where((hd > high) & (down.double() >= low), down, h)
    h = torch.where((hd < low) & (up.double() <= high), up, h)
    return h.float()


@runtime_checkable
class Augmentation(Protocol):
    """What an augmentation op provides (the protocol of ``package.module:factory`` ops).

    ``draw`` returns float32 ``[rng.n, num_params]`` for inputs of ``size`` (H, W);
    ``apply`` maps ``x [B, C, H, W]`` and ``params [B, num_params]`` (on x's device)
    to ``[B, C, *output_size((H, W))]``; ``spec`` is recorded in stores. Optional:
    ``param_dtype(size)``, one of :data:`PARAM_DTYPES` that holds every drawn parameter
    exactly (:func:`param_dtype`; float32 without it).
    """

    num_params: int
    spec: str

    def output_size(self, size: Size) -> Size: ...

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor: ...

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor: ...


def _num(v: float) -> str:
    """Shortest text that parses back to the same float (integers without '.0')."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _size(s: Size) -> str:
    return _num(s[0]) if s[0] == s[1] else f"{s[0]}x{s[1]}"


def _randint(u: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Integers uniform in ``[0, n)`` from uniforms ``u`` in [0, 1) (float64)."""
    n = torch.as_tensor(n, dtype=torch.float64, device=u.device)
    return torch.minimum(torch.floor(u * n), n - 1)


def _exp(t: torch.Tensor) -> torch.Tensor:
    """``exp(t)`` for float64 ``|t| <= 32`` from exact operations: a Taylor series at t/32, squared 5 times."""
    r = t / 32
    p = torch.full_like(r, 1 / math.factorial(12))
    for k in range(11, -1, -1):
        p = p * r + 1 / math.factorial(k)
    for _ in range(5):
        p = p * p
    return p


def _source_index(start: torch.Tensor, n: int, size: int, pad: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, n] source pixels of crop rows (or columns) ``start .. start + n - 1`` of an input of
    ``size`` padded by ``pad`` on each side, and whether each lies inside the input."""
    i = start.long()[:, None] + torch.arange(n, device=start.device) - pad
    inside = (i >= 0) & (i < size)
    if mode == "reflect":  # torch's reflect pad: the edge pixel is not repeated
        i = torch.where(i < 0, -i, torch.where(i >= size, 2 * (size - 1) - i, i))
    return i.clamp(0, size - 1), inside


def _crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: Size, pad: int = 0,
          mode: str = "constant", fill: float = 0.0) -> torch.Tensor:
    """Each image padded by ``pad`` (torchvision's padding modes), then cropped at its own
    ``top, left``: one gather of the source pixels, without building the padded batch."""
    b, c, height, width = x.shape
    h, w = size
    rows, row_in = _source_index(top, h, height, pad, mode)
    cols, col_in = _source_index(left, w, width, pad, mode)
    flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(b, 1, h * w)
    out = x.reshape(b, c, height * width).gather(2, flat.expand(b, c, h * w)).reshape(b, c, h, w)
    if mode == "constant" and pad:
        inside = (row_in[:, :, None] & col_in[:, None, :])[:, None]
        out = torch.where(inside, out, torch.tensor(fill, dtype=out.dtype, device=out.device))
    return out


@dataclass(frozen=True)
class RandomCrop:
    """``RandomCrop(size, padding, fill, padding_mode)``: pad every side, then crop ``size``.

    Params (2): ``top, left`` of the crop in the padded image (whole numbers,
    ``0 <= top <= H + 2 * padding - h``).
    """

    size: Size
    padding: int = 0
    fill: float = 0.0
    padding_mode: str = "constant"
    num_params = 2

    @property
    def spec(self) -> str:
        opts = [_size(self.size)] + [f"padding={self.padding}"] * bool(self.padding)
        opts += [f"fill={_num(self.fill)}"] * (self.fill != 0) + [f"padding_mode={self.padding_mode}"] * (
            self.padding_mode != "constant")
        return f"crop({','.join(opts)})"

    def output_size(self, size: Size) -> Size:
        room = [s + 2 * self.padding - c for s, c in zip(size, self.size)]
        if min(room) < 0:
            raise DataError(f"{self.spec} needs inputs of at least {self.size[0]}x{self.size[1]} after padding, "
                            f"but they are {size[0]}x{size[1]} (+{self.padding} on each side); crop less, or pad more")
        if self.padding_mode == "reflect" and self.padding >= min(size):
            raise DataError(f"{self.spec} reflects {self.padding} pixels, but the inputs are only {size[0]}x{size[1]}; "
                            "pad less than the input size, or use padding_mode=edge")
        return self.size

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor:
        self.output_size(size)
        u = rng.uniform(2)
        top = _randint(u[:, 0], size[0] + 2 * self.padding - self.size[0] + 1)
        left = _randint(u[:, 1], size[1] + 2 * self.padding - self.size[1] + 1)
        return torch.stack([top, left], 1).float()

    def param_dtype(self, size: Size) -> str:
        return _int_dtype(0, max(s + 2 * self.padding - c for s, c in zip(size, self.size)))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return _crop(x, params[:, 0], params[:, 1], self.size, self.padding, self.padding_mode, self.fill)


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """``RandomHorizontalFlip(p)``. Params (1): ``flip``, 1.0 (mirror left-right) or 0.0."""

    p: float = 0.5
    num_params = 1

    @property
    def spec(self) -> str:
        return "flip" if self.p == 0.5 else f"flip(p={_num(self.p)})"

    def output_size(self, size: Size) -> Size:
        return size

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor:
        return (rng.uniform(1) < self.p).float()

    def param_dtype(self, size: Size) -> str:
        return "uint8"

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        w = torch.arange(x.shape[-1], device=x.device)
        cols = torch.where(params[:, :1] > 0.5, x.shape[-1] - 1 - w, w)  # a gather: 2x faster than where
        return x.gather(3, cols[:, None, None, :].expand_as(x))


@dataclass(frozen=True)
class RandomResizedCrop:
    """``RandomResizedCrop(size, scale, ratio)``, bilinear with antialiasing (torchvision's default).

    Params (4): ``top, left, height, width`` of the crop box in the input (whole
    numbers, ``1 <= height <= H``, ``0 <= top <= H - height``; the same for columns).
    Drawn as torchvision does: up to 10 tries of an area fraction uniform in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, else a centred crop.
    """

    size: Size
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    num_params = 4
    tries = 10

    @property
    def spec(self) -> str:
        opts = [_size(self.size)]
        for name, rng, default in (("scale", self.scale, (0.08, 1.0)), ("ratio", self.ratio, (3 / 4, 4 / 3))):
            if rng != default:
                opts.append(f"{name}={_num(rng[0])}-{_num(rng[1])}")
        return f"rrc({','.join(opts)})"

    def output_size(self, size: Size) -> Size:
        return self.size

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor:
        height, width = size
        u = rng.uniform(4 * self.tries).reshape(-1, self.tries, 4)
        area = (self.scale[0] + u[..., 0] * (self.scale[1] - self.scale[0])) * (height * width)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = _exp(lo + u[..., 1] * (hi - lo))
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.int8).argmax(1, keepdim=True)  # the first try that fits, as torchvision's loop
        pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731
        h, w = pick(h), pick(w)
        top, left = _randint(pick(u[..., 2]), height - h + 1), _randint(pick(u[..., 3]), width - w + 1)
        fh, fw, ftop, fleft = (torch.full_like(h, v) for v in self._fallback(height, width))
        box = torch.stack([top, left, h, w], 1)
        return torch.where(ok.any(1, keepdim=True), box, torch.stack([ftop, fleft, fh, fw], 1)).float()

    def _fallback(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's centred crop when no try fits: (h, w, top, left), at least 1x1."""
        ratio = width / height
        h, w = height, width
        if ratio < min(self.ratio):
            h = max(1, int(round(w / min(self.ratio))))
        elif ratio > max(self.ratio):
            w = max(1, int(round(h * max(self.ratio))))
        return h, w, (height - h) // 2, (width - w) // 2

    def param_dtype(self, size: Size) -> str:
        return _int_dtype(0, max(size))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        wy = _resample_weights(params[:, 0], params[:, 2], x.shape[-2], self.size[0])
        wx = _resample_weights(params[:, 1], params[:, 3], x.shape[-1], self.size[1])
        x = torch.matmul(wy[:, None].to(x.dtype), x)
        return torch.matmul(x, wx.transpose(1, 2)[:, None].to(x.dtype))


def _resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """float32 ``[B, out_size, in_size]``: the rows of an antialiased bilinear resize of each
    sample's window ``[start, start + length)`` to ``out_size`` (torch's ``antialias=True``
    triangle filter, the same as PIL's: its support widens with the downscale factor and
    pixels outside the window get no weight)."""
    scale = (length / out_size).float()[:, None, None]
    center = scale * (torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None] + 0.5)
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    rel = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :] - start.float()[:, None, None]
    w = (1 - ((rel - center + 0.5) * invscale).abs()).clamp(min=0)
    w = torch.where((rel >= 0) & (rel < length.float()[:, None, None]), w, torch.zeros_like(w))
    return w / w.sum(2, keepdim=True)


@dataclass(frozen=True)
class RandomAffine:
    """``RandomAffine(degrees, translate, scale, interpolation, fill)`` without shear.

    Params (4): ``angle`` (degrees, counter-clockwise), ``tx, ty`` (whole pixels,
    ``|tx| <= round(translate[0] * W)``), ``scale``. About the image centre, as torchvision.
    ``angle`` and ``scale`` are drawn as float16 values (in their ranges where a range holds
    one), so float16 ``view_params`` hold every view exactly: steps of at most 0.125 degrees
    and 2**-11 of the scale, far below what an augmentation distinguishes.
    """

    degrees: tuple[float, float] = (0.0, 0.0)
    translate: tuple[float, float] = (0.0, 0.0)
    scale: tuple[float, float] = (1.0, 1.0)
    interpolation: str = "nearest"
    fill: float = 0.0
    num_params = 4

    @property
    def spec(self) -> str:
        d0, d1 = self.degrees
        opts = [_num(d1) if d0 == -d1 else f"{_num(d0)}-{_num(d1)}"]
        if self.translate != (0.0, 0.0):
            t0, t1 = self.translate
            opts.append(f"translate={_num(t0)}" + (f"x{_num(t1)}" if t1 != t0 else ""))
        if self.scale != (1.0, 1.0):
            opts.append(f"scale={_num(self.scale[0])}-{_num(self.scale[1])}")
        opts += [f"interpolation={self.interpolation}"] * (self.interpolation != "nearest")
        opts += [f"fill={_num(self.fill)}"] * (self.fill != 0)
        return f"affine({','.join(opts)})"

    def output_size(self, size: Size) -> Size:
        return size

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor:
        u = rng.uniform(4)
        angle = self.degrees[0] + u[:, 0] * (self.degrees[1] - self.degrees[0])
        dx, dy = self.translate[0] * size[1], self.translate[1] * size[0]
        tx = torch.round(-dx + u[:, 1] * (2 * dx))
        ty = torch.round(-dy + u[:, 2] * (2 * dy))
        scale = self.scale[0] + u[:, 3] * (self.scale[1] - self.scale[0])
        angle, scale = _half_within(angle, *self.degrees), _half_within(scale, *self.scale)
        return torch.stack([angle.double(), tx, ty, scale.double()], 1).float()

    def param_dtype(self, size: Size) -> str:
        reach = max(round(self.translate[0] * size[1]), round(self.translate[1] * size[0])) + 1
        return "float16" if reach <= 2048 else "float32"

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = params.to(torch.float64)
        rot = p[:, 0] * (math.pi / 180)  # torchvision's inverse matrix, in the same float64 steps
        cos, sin, s = torch.cos(rot), torch.sin(rot), p[:, 3]
        m0, m1, m3, m4 = cos / s, sin / s, -sin / s, cos / s
        m2 = m0 * -p[:, 1] + m1 * -p[:, 2]
        m5 = m3 * -p[:, 1] + m4 * -p[:, 2]
        dtype = x.dtype if x.is_floating_point() else torch.float32
        theta = torch.stack([m0, m1, m2, m3, m4, m5], 1).to(dtype).reshape(b, 2, 3)
        base = torch.empty(1, h, w, 3, dtype=dtype, device=x.device)  # torchvision's _affine_grid
        base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device))
        base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device)[:, None])
        base[..., 2].fill_(1)
        theta = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=x.device)
        grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(theta).view(b, h, w, 2)
        # A ones channel marks what came from inside the image; the rest gets `fill` (as torchvision).
        img = torch.cat([x.to(dtype), torch.ones_like(x[:, :1], dtype=dtype)], 1)
        out = F.grid_sample(img, grid, mode=self.interpolation, padding_mode="zeros", align_corners=False)
        out, mask = out[:, :c], out[:, c:]
        if self.interpolation == "nearest":
            return torch.where(mask < 0.5, torch.full_like(out, self.fill), out)
        return (out - self.fill) * mask + self.fill


class Compose:
    """Ops applied in order; params are the ops' params side by side (``num_params`` = their sum).

    Op ``i`` draws from ``rng.stream(i)``, so adding an op at the end leaves the
    earlier ops' params unchanged.
    """

    def __init__(self, ops: list[Augmentation]) -> None:
        self.ops = list(ops)
        self.num_params = sum(int(op.num_params) for op in self.ops)

    @property
    def spec(self) -> str:
        return "+".join(op.spec for op in self.ops)

    def __repr__(self) -> str:
        return f"Compose({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compose) and self.ops == other.ops

    def output_size(self, size: Size) -> Size:
        for op in self.ops:
            size = tuple(op.output_size(size))
        return size

    def param_dtype(self, size: Size) -> str:
        """The widest of its ops' :func:`param_dtype` (each at the size its input has)."""
        widest = 0
        for op in self.ops:
            widest = max(widest, PARAM_DTYPES.index(param_dtype(op, size)))
            size = tuple(op.output_size(size))
        return PARAM_DTYPES[widest]

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor:
        parts = []
        for i, op in enumerate(self.ops):
            params = op.draw(rng.stream(i), size)
            if not isinstance(params, torch.Tensor) or tuple(params.shape) != (rng.n, op.num_params):
                got = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
                raise DataError(f"augmentation '{op.spec}' drew params {got}, not [{rng.n}, {op.num_params}]; "
                                "make draw() return float32 [n, num_params]")
            parts.append(params.float())
            size = tuple(op.output_size(size))
        return torch.cat(parts, 1) if parts else torch.empty(rng.n, 0, device=rng.device)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if params.ndim != 2 or params.shape != (x.shape[0], self.num_params):
            raise DataError(f"augmentation '{self.spec}' takes params [{x.shape[0]}, {self.num_params}], "
                            f"got {list(params.shape)}; pass the params drawn for this spec")
        params = params.to(x.device)
        at = 0
        for op in self.ops:
            x = op.apply(x, params[:, at:at + op.num_params])
            at += op.num_params
        return x
