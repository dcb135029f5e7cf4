"""imagefolder:DIR data: ImageFolder's order and class names, exact pixels, workers.

Order and resizing are checked against plain references (a sorted directory listing, numpy
indexing, Pillow's resize) everywhere, and against torchvision where ``import torchvision`` succeeds.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from softlabels.errors import DataError, SpecError
from softlabels.inputs.fingerprints import fingerprint
from softlabels.inputs.spec import resolve_data
from tests.conftest import run_cli

Image = pytest.importorskip("PIL.Image")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # sorted != digit order


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """120 scikit-learn digits as 8x8 grayscale PNGs in DIR/<name>/, some in a nested folder."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images[:120] * (255 / 16)).astype(np.uint8)
    root = tmp_path_factory.mktemp("digits")
    for i, (img, label) in enumerate(zip(pixels, bunch.target[:120])):
        folder = root / NAMES[label] / ("nested" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"d{i:04d}.png")
    (root / "one" / "notes.txt").write_text("not an image")
    return root, pixels, bunch.target[:120]


def _expected_order(root: Path) -> list[tuple[str, int]]:
    """(path, label) pairs in ImageFolder's order, computed independently: sorted classes, sorted walk."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    out = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*.png"), key=lambda p: (str(p.parent), p.name)):
            out.append((str(path), label))
    return out


def test_reads_the_digits_back_exactly(digits_dir):
    root, pixels, target = digits_dir
    ds = resolve_data(f"imagefolder:{root}?gray")
    assert ds.classes == sorted(NAMES) and ds.num_classes == 10 and ds.has_labels
    assert ds.input_shape == (1, 8, 8) and len(ds) == 120
    by_file = {int(Path(f).stem[1:]): i for i, f in enumerate(ds.files)}
    for idx, i in by_file.items():
        x, y = ds[i]
        assert x.dtype == torch.float32 and torch.equal(x[0], torch.from_numpy(pixels[idx] / np.float32(255)))
        assert ds.classes[int(y)] == NAMES[target[idx]]
    rgb = resolve_data(f"imagefolder:{root}")
    x3, _ = rgb.get_batch(np.arange(10))
    x1, _ = ds.get_batch(np.arange(10))
    assert x3.shape == (10, 3, 8, 8) and torch.equal(x3, x1.expand(-1, 3, -1, -1))


def test_order_and_classes_equal_a_sorted_listing(digits_dir):
    root = digits_dir[0]
    ds = resolve_data(f"imagefolder:{root}?gray")
    assert list(zip(ds.files, ds._labels.tolist())) == _expected_order(root)
    assert ds.classes == sorted(NAMES) and ds.class_to_idx == {name: i for i, name in enumerate(sorted(NAMES))}


def test_order_and_classes_equal_torchvision_imagefolder(digits_dir):
    tv = pytest.importorskip("torchvision")
    root = digits_dir[0]
    ds = resolve_data(f"imagefolder:{root}?gray")
    theirs = tv.datasets.ImageFolder(str(root))
    assert theirs.classes == ds.classes and theirs.class_to_idx == ds.class_to_idx
    assert [(p, y) for p, y in theirs.samples] == list(zip(ds.files, ds._labels.tolist()))


SIZES = [(30, 45), (50, 20), (16, 16), (7, 9), (12, 20)]  # (h, w): down, down, square, up, shorter side already 12


@pytest.fixture
def sized(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "c" / f"{i}.png")
    return resolve_data(f"imagefolder:{tmp_path}?size=12")


def test_size_resizes_the_shorter_side_then_crops_the_centre(sized):
    """Shorter side to 12 with Pillow's bilinear resize (the longer side scaled and truncated), then
    the centre 12x12 by indexing (offsets rounded half to even); an image whose shorter side is
    already 12 is only cropped, pixel for pixel."""
    for i, path in enumerate(sized.files):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        new = (12, int(12 * h / w)) if w <= h else (int(12 * w / h), 12)
        pixels = np.asarray(img if new == (w, h) else img.resize(new, Image.BILINEAR))
        top, left = round((new[1] - 12) / 2), round((new[0] - 12) / 2)
        want = torch.from_numpy(pixels[top:top + 12, left:left + 12].transpose(2, 0, 1) / np.float32(255))
        assert torch.equal(sized[i][0], want), path
        if min(w, h) == 12:
            original = np.asarray(Image.open(path).convert("RGB"))[top:top + 12, left:left + 12]
            assert torch.equal(sized[i][0], torch.from_numpy(original.transpose(2, 0, 1) / np.float32(255)))


def test_size_equals_torchvision_resize_and_center_crop(sized):
    pytest.importorskip("torchvision")
    from torchvision.transforms import v2

    pipeline = v2.Compose([v2.Resize(12), v2.CenterCrop(12), v2.PILToTensor()])
    for i, path in enumerate(sized.files):
        want = pipeline(Image.open(path).convert("RGB")).float() / 255
        assert torch.equal(sized[i][0], want), path


def test_unlabeled_and_fingerprint(digits_dir):
    root = digits_dir[0]
    ds = resolve_data(f"imagefolder:{root}?gray,unlabeled")
    assert not ds.has_labels and ds.num_classes == 10 and (ds.get_batch(np.arange(5))[1] == -1).all()
    gray = fingerprint(resolve_data(f"imagefolder:{root}?gray"))
    assert gray == fingerprint(resolve_data(f"imagefolder:{root}?gray"))
    assert gray != fingerprint(resolve_data(f"imagefolder:{root}"))


def test_decoded_in_workers(digits_dir):
    ds = resolve_data(f"imagefolder:{digits_dir[0]}?gray")
    assert len(pickle.dumps(ds)) < 40_000  # paths and labels only
    loader = DataLoader(ds, batch_size=32, num_workers=2)
    x = torch.cat([xb for xb, _ in loader])
    assert torch.equal(x, ds.get_batch(np.arange(len(ds)))[0])


def test_bad_folders_and_options(tmp_path, digits_dir):
    with pytest.raises(DataError, match="does not exist"):
        resolve_data(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in"):
        resolve_data(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(SpecError, match="unknown or bad imagefolder option 'size=0'"):
        resolve_data(f"imagefolder:{digits_dir[0]}?size=0")
    mixed = tmp_path / "mixed" / "a"
    mixed.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(mixed / "0.png")
    Image.new("RGB", (9, 8)).save(mixed / "1.png")
    with pytest.raises(DataError, match="add \\?size=S"):
        resolve_data(f"imagefolder:{mixed.parent}").get_batch(np.arange(2))
    assert resolve_data(f"imagefolder:{mixed.parent}?size=8").get_batch(np.arange(2))[0].shape == (2, 3, 8, 8)
    (mixed / "2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode image"):
        resolve_data(f"imagefolder:{mixed.parent}?size=8")[2]


def test_generate_and_train_on_an_imagefolder(digits_dir, tmp_path):
    root = digits_dir[0]
    store = tmp_path / "s.h5"
    r = run_cli("generate", "--teacher", "cnn", "--random-teacher", "--data", f"imagefolder:{root}?gray", "--out", str(store),
                "--batch-size", "32", "--no-progress")
    assert r.exit_code == 0, r.output
    r = run_cli("train", "--student", "cnn", "--store", str(store), "--epochs", "1", "--batch-size", "32",
                "--no-progress", "--out", str(tmp_path / "run"))
    assert r.exit_code == 0, r.output
