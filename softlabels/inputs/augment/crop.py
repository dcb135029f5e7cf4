"""The ops that copy pixels without resampling: ``crop`` (with padding) and ``flip``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from softlabels.errors import DataError
from softlabels.inputs.augment.compose import BuiltinOp, ParamRanges, Size, _num, _size
from softlabels.inputs.augment.rng import ViewRandom, _randint

__all__ = ["PADDING_MODES", "RandomCrop", "RandomHorizontalFlip"]

PADDING_MODES = ("constant", "edge", "reflect")  # torchvision's names


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
class RandomCrop(BuiltinOp):
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

    def param_ranges(self, size: Size | None) -> ParamRanges:
        """``top`` in 0..H + 2 padding - h, ``left`` in 0..W + 2 padding - w, whole numbers."""
        room = [math.inf] * 2 if size is None else [s + 2 * self.padding - c for s, c in zip(size, self.size)]
        return ParamRanges.of([(0, room[0], True), (0, room[1], True)])

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return _crop(x, params[:, 0], params[:, 1], self.size, self.padding, self.padding_mode, self.fill)


@dataclass(frozen=True)
class RandomHorizontalFlip(BuiltinOp):
    """``RandomHorizontalFlip(p)``. Params (1): ``flip``, 1.0 (mirror left-right) or 0.0."""

    p: float = 0.5
    num_params = 1

    @property
    def spec(self) -> str:
        return "flip" if self.p == 0.5 else f"flip(p={_num(self.p)})"

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor:
        return (rng.uniform(1) < self.p).float()

    def param_ranges(self, size: Size | None) -> ParamRanges:
        """``flip`` is 0 or 1."""
        return ParamRanges.of([(0, 1, True)])

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        w = torch.arange(x.shape[-1], device=x.device)
        cols = torch.where(params[:, :1] > 0.5, x.shape[-1] - 1 - w, w)  # a gather: 2x faster than where
        return x.gather(3, cols[:, None, None, :].expand_as(x))
