"""``rrc``: a random box of the input resized to a fixed size, bilinear with antialiasing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from softlabels.inputs.augment.compose import BuiltinOp, ParamRanges, Size, _num, _size
from softlabels.inputs.augment.rng import ViewRandom, _exp, _randint

__all__ = ["RandomResizedCrop"]


@dataclass(frozen=True)
class RandomResizedCrop(BuiltinOp):
    """``RandomResizedCrop(size, scale, ratio)``, bilinear with antialiasing (torchvision's default).

    Params (4): the crop box ``top, left, height, width`` in the input (whole numbers), drawn as
    torchvision does: up to 10 tries of area and log-uniform aspect ratio, else a centred crop.
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

    def param_ranges(self, size: Size | None) -> ParamRanges:
        """Whole numbers: ``1 <= height <= H``, ``0 <= top <= H - height`` (the same for columns)."""
        h, w = (math.inf, math.inf) if size is None else size
        return ParamRanges.of([(0, h - 1, True), (0, w - 1, True), (1, h, True), (1, w, True)],
                              sums=[(0, 2, h), (1, 3, w)])

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
