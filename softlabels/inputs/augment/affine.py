"""``affine``: rotation, whole-pixel translation and scale about the image centre (no shear)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softlabels.inputs.augment.compose import BuiltinOp, ParamRanges, Size, _num
from softlabels.inputs.augment.rng import ViewRandom, _half_within

__all__ = ["RandomAffine"]


@dataclass(frozen=True)
class RandomAffine(BuiltinOp):
    """``RandomAffine(degrees, translate, scale, interpolation, fill)`` without shear, about the
    image centre.

    Params (4): ``angle`` (degrees), ``tx, ty`` (whole pixels), ``scale``; ``angle`` and ``scale``
    are float16 values, so float16 ``view_params`` hold every view exactly (docs/VIEWS.md).
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

    def param_ranges(self, size: Size | None) -> ParamRanges:
        """``angle`` in degrees, ``scale`` in scale (each to float16's rounding), whole ``|tx|, |ty|`` up to
        ``round(translate * W)``, ``round(translate * H)``."""
        tx, ty = (math.inf, math.inf) if size is None else \
            (round(self.translate[0] * size[1]), round(self.translate[1] * size[0]))
        return ParamRanges.of([(*_widened(self.degrees), False), (-tx, tx, True), (-ty, ty, True),
                               (*_widened(self.scale), False)])

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


def _widened(bounds: tuple[float, float]) -> tuple[float, float]:
    """A range widened by float16's rounding (a range holding no float16 value gets its nearest)."""
    lo, hi = bounds
    return lo - abs(lo) * 2**-10 - 2**-24, hi + abs(hi) * 2**-10 + 2**-24
