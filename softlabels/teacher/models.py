"""Small built-in architectures for the demo and the tests, built for any per-sample input shape
and class count (8x8 digits, flat vectors, small C×H×W images); seeded by ``torch.manual_seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from softlabels.errors import ModelMismatch, SpecError

__all__ = ["BUILTIN_MODELS", "MLP", "CNN", "build_model", "count_parameters", "count_flops"]


class MLP(nn.Module):
    """Flatten the input, then ``Linear → ReLU`` per hidden width, then a linear head."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """3x3 conv stack (the last one strided), 2x2 adaptive average pool, MLP head.

    Flat inputs are reshaped to ``image_shape`` first, so a 64-vector becomes 1x8x8.
    """

    def __init__(self, image_shape: tuple[int, int, int], channels: tuple[int, ...], hidden: tuple[int, ...],
                 num_classes: int) -> None:
        super().__init__()
        self.image_shape = image_shape
        layers: list[nn.Module] = []
        c_in = image_shape[0]
        for i, c_out in enumerate(channels):
            stride = 2 if i == len(channels) - 1 else 1
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
            c_in = c_out
        # A fixed 2x2 pool makes the head independent of the image size.
        layers.append(nn.AdaptiveAvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = MLP(c_in * 4, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.features(x))


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Interpret ``input_shape`` as C×H×W: 3-D as is, 2-D as 1×H×W, a flat square as 1×s×s."""
    if len(input_shape) == 3:
        return (input_shape[0], input_shape[1], input_shape[2])
    if len(input_shape) == 2:
        return (1, input_shape[0], input_shape[1])
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side == input_shape[0] and side > 0:
            return (1, side, side)
    raise ModelMismatch(f"model '{name}' needs image-like inputs (C×H×W, H×W or a flat perfect square), "
                        f"got per-item shape {tuple(input_shape)}; use 'mlp' or 'linear' for these inputs")


BUILTIN_MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "linear": lambda shape, c: MLP(math.prod(shape), (), c),
    "mlp": lambda shape, c: MLP(math.prod(shape), (32,), c),
    "mlp-large": lambda shape, c: MLP(math.prod(shape), (512, 512), c),
    "cnn": lambda shape, c: CNN(_image_shape("cnn", shape), (16, 32), (), c),
    "cnn-large": lambda shape, c: CNN(_image_shape("cnn-large", shape), (64, 128, 128), (256,), c),
}
"""Built-in architectures by name: ``builder(input_shape, num_classes) -> nn.Module``.
``mlp``/``cnn`` are student-sized, ``mlp-large``/``cnn-large`` teacher-sized."""


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the built-in architecture ``name`` for per-sample ``input_shape`` and ``num_classes``."""
    builder = BUILTIN_MODELS.get(name)
    if builder is None:
        raise SpecError(f"unknown built-in model '{name}'; use one of: {', '.join(BUILTIN_MODELS)}, "
                        "a module:factory, a TorchScript file or a .pt2 torch.export file")
    if num_classes < 1 or not input_shape or min(input_shape) < 1:
        raise ModelMismatch(f"cannot build '{name}' for input shape {tuple(input_shape)} and {num_classes} classes; "
                            "pass a non-empty input shape and at least one class")
    return builder(tuple(input_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample in ``model``'s Linear and Conv layers (biases ignored),
    hooked on one zero input: opaque TorchScript or exported modules report 0."""
    macs = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            per_output = module.in_features
        else:  # a Conv*d: one MAC per kernel tap per input channel of its group
            per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        macs += output.numel() * per_output

    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]
    handles = [m.register_forward_hook(hook) for m in layers]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs
