"""``--data imagefolder:DIR[?size=S][,gray]``: the torchvision ImageFolder layout, decoded lazily
by Pillow to float32 ``[C, H, W]`` in [0, 1], in ``ImageFolder``'s order (docs/VIEWS.md, "Image
folders", has each Pillow mode's rule; :mod:`softlabels.inputs.files` which files the scan reads).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from softlabels.errors import DataError, SpecError
from softlabels.inputs.arrays import InputDataset
from softlabels.inputs.files import require_regular, scan_folder

__all__ = ["IMAGE_EXTENSIONS", "IMAGEFOLDER_OPTIONS", "ImageFolderDataset", "open_imagefolder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File suffixes read as images (torchvision's IMG_EXTENSIONS), any case."""

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
"""Pillow's modes of 16-bit unsigned gray pixels (16-bit PNGs, TIFFs)."""

IMAGEFOLDER_OPTIONS = ("size=S", "gray")
"""Options after ``imagefolder:DIR?`` (``unlabeled`` works as for every data spec)."""


def _pillow():
    try:
        from PIL import Image
    except ImportError as err:
        raise DataError("imagefolder data needs Pillow; pip install 'softlabels[vision]'") from err
    return Image


def _scan(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, files, labels) in torchvision ImageFolder's order."""
    if not root.is_dir():
        raise DataError(f"imagefolder directory '{root}' does not exist; check the path in --data")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())  # links too: scan_folder refuses
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = scan_folder(root, root / name, lambda fname: fname.lower().endswith(IMAGE_EXTENSIONS))
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"no images in '{root}'; lay it out as {root}/<class>/<image>.png or .jpg "
                        "(one folder per class, as torchvision's ImageFolder)")
    return classes, files, np.asarray(labels, dtype=np.int64)


class ImageFolderDataset(InputDataset):
    """Images in ``root/<class>/...``; ``classes`` lists the class names (label ``i`` is ``classes[i]``).

    Holds only paths and labels, so it pickles small and each worker decodes its own items.
    """

    def __init__(self, root: str | os.PathLike[str], *, size: int | None = None, gray: bool = False) -> None:
        self.root, self.size, self.gray = Path(root), size, gray
        self.classes, self.files, self._labels = _scan(self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.has_labels = True
        first = self._decode(0)
        self.input_shape = tuple(first.shape)

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, index: int) -> np.ndarray:
        Image = _pillow()
        path = self.files[index]
        try:
            require_regular(path)  # again here, in the worker: the folder may have changed since the scan
            with Image.open(path) as img:
                img, full_scale = _convert(img, self.gray, path)
                if self.size is not None:
                    img = _resize_center_crop(img, self.size, Image)
                pixels = np.asarray(img, dtype=np.float32)
        except DataError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot decode image '{path}' ({err}); remove or replace the file") from err
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        if not self.gray and pixels.shape[0] == 1:  # 16-bit gray, kept in one channel until here
            pixels = np.repeat(pixels, 3, axis=0)
        if hasattr(self, "input_shape") and pixels.shape != self.input_shape:
            raise DataError(f"image '{path}' is {pixels.shape[2]}x{pixels.shape[1]} but the first image is "
                            f"{self.input_shape[2]}x{self.input_shape[1]}; add ?size=S to resize them all")
        return pixels / np.float32(full_scale)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        i %= len(self)
        return torch.from_numpy(self._decode(i)), torch.tensor(self._labels[i])


def _convert(img, gray: bool, path: str):  # noqa: ANN001, ANN202 - PIL types stay optional
    """``(image, full scale)``: ``img`` in mode L or RGB (full scale 255), or F holding 16-bit values
    (full scale 65535, one channel); docs/VIEWS.md says how each Pillow mode gets there."""
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        if img.mode == "I":  # 32 bits; older Pillow opened 16-bit PNGs so: read as 16-bit when it fits
            lo, hi = img.getextrema()
            if lo < 0 or hi > 0xFFFF:
                raise _no_known_range(path, img.mode, f"32-bit integers from {lo} to {hi}")
        return img.convert("F"), 0xFFFF  # exact: float32 holds every integer below 2**24
    if img.mode == "F":
        raise _no_known_range(path, img.mode, "floating point")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what Pillow asks for (with a warning) before dropping the alpha
    return img.convert("L" if gray else "RGB"), 0xFF


def _no_known_range(path: str, mode: str, detail: str) -> DataError:
    return DataError(f"image '{path}' has mode {mode} pixels ({detail}), which map to [0, 1] in no known way; "
                     "save it with 8 or 16 bits per channel")


def _resize_center_crop(img, size: int, Image):  # noqa: ANN001, ANN202 - PIL types stay optional
    """torchvision's ``Resize(size)`` (shorter side, bilinear, antialiased) then ``CenterCrop(size)``."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def open_imagefolder(root: str, options: list[str], spec: str) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` for ``imagefolder:root?options`` (``unlabeled`` already removed)."""
    size: int | None = None
    gray = False
    for opt in options:
        key, eq, value = opt.partition("=")
        if key == "size" and eq and value.isdigit() and int(value) >= 1:
            size = int(value)
        elif opt == "gray":
            gray = True
        else:
            raise SpecError(f"unknown or bad imagefolder option '{opt}' in '{spec}'; "
                            f"supported: {', '.join('?' + o for o in IMAGEFOLDER_OPTIONS)} (S a whole number >= 1)"
                            ", ?unlabeled")
    return ImageFolderDataset(root, size=size, gray=gray)
