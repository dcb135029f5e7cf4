"""--augment terms spelled as torchvision spells them read as the grammar's own ops (and replay alike)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softlabels as sl
from softlabels.errors import SpecError
from softlabels.inputs.augment import parse_augment

SAME = [
    ("RandomResizedCrop(224, scale=(0.08, 1.0)) + RandomHorizontalFlip()", "rrc(224,scale=0.08-1)+flip"),
    ("RandomResizedCrop((32, 24), scale=(0.5, 1.0), ratio=(0.75, 1.25))", "rrc(32x24,scale=0.5-1,ratio=0.75-1.25)"),
    (["RandomCrop(32, padding=4)", "T.RandomHorizontalFlip(p=0.3)"], "crop(32,padding=4)+flip(p=0.3)"),
    ("RandomCrop(8, padding=1, padding_mode='edge')", "crop(8,padding=1,padding_mode=edge)"),
    ("RandomAffine(15, translate=(0.1, 0.2), scale=(0.9, 1.1))", "affine(15,translate=0.1x0.2,scale=0.9-1.1)"),
    ("RandomCrop(32, padding=4) + flip", "crop(32,padding=4)+flip"),
    ("flip + T.RandomCrop(32, padding=4)", "flip+crop(32,padding=4)"),
]


@pytest.mark.parametrize("torchvision, ours", SAME)
def test_torchvision_spelling_is_the_same_op(torchvision, ours):
    assert parse_augment(torchvision) == parse_augment(ours)
    assert parse_augment(torchvision).spec == parse_augment(ours).spec  # stores record the canonical text


@pytest.mark.parametrize("term, message", [
    ("ColorJitter(0.4, 0.4, 0.4)", "ColorJitter is not replayable from stored view parameters in softlabels"),
    ("RandomResizedCrop(224, antialias=True)", "antialias=True is not replayable from stored parameters here"),
    ("RandomCrop(32, pad_if_needed=True)", "pad_if_needed=True is not replayable"),
    ("RandomCrop(32, foo=1)", "has no argument 'foo'; RandomCrop takes size, padding"),
    ("RandomCrop(32, padding=(1, 2, 3, 4))", "padding=(1, 2, 3, 4) has no replayable counterpart here"),
    ("RandomAffine(10, interpolation=InterpolationMode.BILINEAR)", "arguments must be numbers, strings or tuples"),
])
def test_what_cannot_replay_is_refused_in_one_line(term, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        parse_augment(term)
    assert "\n" not in str(err.value)


def test_a_store_generated_with_torchvision_names_replays_in_the_library(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((12, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "img.npz", x=x, y=rng.integers(0, 3, 12))
    spec = ["RandomCrop(8, padding=1)", "RandomHorizontalFlip()"]
    out = tmp_path / "v.h5"
    sl.generate(teacher="mlp", data=str(tmp_path / "img.npz"), out=str(out), random_teacher=True, views=2,
                augment=" + ".join(spec), layout="dense", num_classes=3, progress=False)
    store = sl.open_store(out)
    assert store.positions.augment == "crop(8,padding=1)+flip"
    aug = parse_augment(spec)
    ds = sl.with_targets(torch.utils.data.TensorDataset(torch.from_numpy(x)), out, view_transform="replay")
    params = store.whole("view_params")
    from softlabels.store.positions.views import choose_views

    for i in (0, 5):
        (got,), _ = ds[i]
        v = int(choose_views(store.positions.seed, np.array([i]), 0, 2)[0])
        want = aug.apply(torch.from_numpy(x[i:i + 1]), torch.from_numpy(params[i:i + 1, v].astype(np.float32)))[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
