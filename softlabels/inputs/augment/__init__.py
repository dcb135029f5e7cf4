"""Augmentation ops whose random parameters are drawn per view and replayed exactly.

View ``v`` of sample ``i`` draws its parameters from ``(seed, i, v)`` alone (:class:`ViewRandom`),
and a store keeps them (``view_params`` [N, V, P], :func:`param_dtype`) to replay the view at
training time. docs/VIEWS.md has the ops, their parameters and the spec grammar.
"""

from __future__ import annotations

import torch

from softlabels.errors import DataError
from softlabels.inputs.augment.affine import RandomAffine
from softlabels.inputs.augment.compose import PARAM_DTYPES, Augmentation, Compose, param_dtype
from softlabels.inputs.augment.crop import RandomCrop, RandomHorizontalFlip
from softlabels.inputs.augment.grammar import BUILTIN_OPS, parse_augment
from softlabels.inputs.augment.resized_crop import RandomResizedCrop
from softlabels.inputs.augment.rng import ViewRandom
from softlabels.inputs.fingerprints import refuse_random_data

__all__ = [
    "BUILTIN_OPS", "PARAM_DTYPES", "Augmentation", "Compose", "RandomAffine", "RandomCrop", "RandomHorizontalFlip",
    "RandomResizedCrop", "ViewRandom", "draw_views", "param_dtype", "parse_augment", "refuse_random_data", "view_shape",
]


def view_shape(aug: Augmentation, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``[C, h, w]`` of one view of inputs shaped ``input_shape`` ``[C, H, W]``."""
    if len(input_shape) != 3:
        raise DataError(f"--augment '{aug.spec}' needs image inputs [C, H, W], but the inputs have shape "
                        f"{tuple(input_shape)}; pass images, or drop --views/--augment")
    return (input_shape[0], *aug.output_size(tuple(input_shape[1:])))


def draw_views(aug: Augmentation, seed: int, ids: torch.Tensor, views: int | torch.Tensor,
               input_shape: tuple[int, ...]) -> torch.Tensor:
    """float32 params of views ``(ids[r], views[r])`` (on ids' device), as a store keeps them
    (:func:`param_dtype`): ``[len(ids), V, P]`` for an int ``views`` ``V`` (every view of every id,
    the layout of ``view_params``), ``[len(ids), P]`` for a tensor shaped like ``ids``."""
    view_shape(aug, input_shape)  # refuses inputs that are no images, and crops larger than them
    size = (int(input_shape[1]), int(input_shape[2]))
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if isinstance(views, int):
        grid = torch.arange(views, device=ids.device)
        flat = aug.draw(ViewRandom(seed, ids.repeat_interleave(views), grid.repeat(len(ids))), size)
        out = flat.reshape(len(ids), views, aug.num_params)
    else:
        out = aug.draw(ViewRandom(seed, ids, torch.as_tensor(views, device=ids.device)), size)
    dtype = getattr(torch, param_dtype(aug, size))
    return out.to(dtype).float()  # the stored numbers: what the teacher sees is what replays
