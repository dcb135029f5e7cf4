"""torchvision (the `vision` extra) for the tests that compare against it."""

from __future__ import annotations

import pytest
import torch

_LIB: list[torch.library.Library] = []


def torchvision():
    """The torchvision package, or skip the test.

    A torchvision wheel built for CUDA torch cannot load its compiled ops under a CPU
    build of torch, and its import then fails on the fake kernels it registers for two
    detection ops. The transforms and the ImageFolder used here are pure Python and
    torch, so defining those two operator schemas first lets them import.
    """
    pytest.importorskip("PIL")
    try:
        import torchvision as tv
    except ImportError:
        pytest.skip("torchvision is not installed (pip install 'softlabels[vision]')")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.append(lib)  # the definitions live as long as the library object
        import torchvision as tv
    return tv


def functional():
    """``torchvision.transforms.v2.functional``, or skip."""
    torchvision()
    from torchvision.transforms.v2 import functional as F

    return F
