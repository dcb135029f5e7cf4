"""imagefolder:DIR data: ImageFolder's order and class names, exact pixels, workers.

Order and resizing are checked against plain references (a sorted directory listing, numpy
indexing, Pillow's resize) everywhere, and against torchvision where ``import torchvision`` succeeds.
"""

from __future__ import annotations

import pickle
import warnings
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


# -- pixel modes: every mode to float32 [0, 1], checked against a direct formula ---------------------
def _luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L (ITU-R 601-2 luma, in its fixed-point form)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """Pillow's CMYK -> RGB (no colour profile): (255 - K) - C (255 - K) / 255, rounded as Pillow does."""
    c = cmyk.astype(np.int64)
    nk = 255 - c[..., 3:]
    t = c[..., :3] * nk + 128
    return np.clip(nk - (((t >> 8) + t) >> 8), 0, 255)


def _single_image(tmp_path: Path, img, name: str) -> tuple[Path, str]:
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    img.save(root / "a" / name)
    with Image.open(root / "a" / name) as check:
        mode = check.mode
    return root, mode


def _read(root: Path, *options: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning reaches the user's terminal either
        spec = f"imagefolder:{root}" + (f"?{','.join(options)}" if options else "")
        return resolve_data(spec)[0][0].numpy()


@pytest.mark.parametrize(("mode", "dtype", "name"), [("I;16", "<u2", "0.png"), ("I;16B", ">u2", "0.tiff"),
                                                     ("I", "<i4", "0.tiff")])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, mode, dtype, name):
    """A 16-bit PNG became all white (a plain RGB conversion clips it); value v is v / 65535, exactly."""
    v = (np.arange(48).reshape(6, 8) * 1361).astype(np.uint16)
    v[0, :2] = 0, 65535
    root, opened = _single_image(tmp_path, Image.fromarray(v.astype(dtype)), name)
    assert opened == mode
    want = v.astype(np.float32) / np.float32(65535)
    assert np.array_equal(_read(root, "gray"), want[None])
    assert np.array_equal(_read(root), np.repeat(want[None], 3, axis=0))


def test_16_bit_images_resize_in_floating_point(tmp_path):
    root, _ = _single_image(tmp_path, Image.fromarray(np.full((10, 14), 40_000, np.uint16)), "0.png")
    assert np.array_equal(_read(root, "size=6", "gray"), np.full((1, 6, 6), np.float32(40_000) / np.float32(65535)))
    ramp = np.linspace(0, 65535, 20 * 30).reshape(20, 30).astype(np.uint16)
    (root / "a" / "0.png").unlink()
    Image.fromarray(ramp).save(root / "a" / "0.png")
    x = _read(root, "size=8")
    assert x.shape == (3, 8, 8) and 0 <= x.min() < 0.3 < 0.7 < x.max() <= 1  # a ramp, not white


def _eight_bit_cases():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    bits = rng.integers(0, 2, (6, 8)).astype(bool)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    cmyk = rng.integers(0, 256, (6, 8, 4), dtype=np.uint8)

    def pal(transparent: bool):
        img = Image.fromarray(index, mode="L").convert("P")
        img.putpalette(palette.reshape(-1).tolist())
        if transparent:
            img.info["transparency"] = bytes(rng.integers(0, 256, 256, dtype=np.uint8))
        return img

    return {  # name: (image, file name, its RGB as uint8 [H, W, 3], or None when gray is the source)
        "1": (Image.fromarray(bits), "0.png", np.repeat(bits[..., None] * np.uint8(255), 3, -1)),
        "L": (Image.fromarray(gray), "0.png", np.repeat(gray[..., None], 3, -1)),
        "P": (pal(False), "0.png", palette[index]),
        "P+transparency": (pal(True), "0.png", palette[index]),  # alpha dropped
        "RGB": (Image.fromarray(rgb), "0.png", rgb),
        "RGBA": (Image.fromarray(rgba), "0.png", rgba[..., :3]),  # alpha dropped, as torchvision's loader does
        "LA": (Image.merge("LA", [Image.fromarray(gray), Image.fromarray(gray[::-1])]), "0.png",
               np.repeat(gray[..., None], 3, -1)),  # alpha dropped
        "CMYK": (Image.frombytes("CMYK", (8, 6), cmyk.tobytes()), "0.tiff", _cmyk_to_rgb(cmyk)),
    }


@pytest.mark.parametrize("case", list(_eight_bit_cases()))
def test_eight_bit_modes_convert_as_documented(tmp_path, case):
    img, name, rgb = _eight_bit_cases()[case]
    root, opened = _single_image(tmp_path, img, name)
    assert opened == case.partition("+")[0]
    want = rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    assert np.array_equal(_read(root), want)
    gray_source = case in ("1", "L", "LA")
    luma = rgb[..., 0] if gray_source else _luma(rgb)
    assert np.array_equal(_read(root, "gray"), luma[None].astype(np.float32) / np.float32(255))


@pytest.mark.parametrize(("img", "detail"), [
    (lambda: Image.fromarray(np.array([[-5, 70_000]], np.int32)), "32-bit integers from -5 to 70000"),
    (lambda: Image.fromarray(np.array([[0.0, 2.5]], np.float32)), "floating point"),
])
def test_pixels_without_a_known_range_are_refused(tmp_path, img, detail):
    root, _ = _single_image(tmp_path, img(), "0.tiff")
    with pytest.raises(DataError, match=f"image '.*0.tiff' has mode . pixels \\({detail}\\), which map to "
                                        r"\[0, 1\] in no known way; save it with 8 or 16 bits per channel"):
        resolve_data(f"imagefolder:{root}")


def test_16_bit_rgb_keeps_its_top_8_bits(tmp_path):
    """Pillow has no 48-bit RGB mode: such a PNG reads as RGB of each value's high byte (as documented)."""
    import struct
    import zlib

    v = np.random.default_rng(4).integers(0, 65536, (5, 7, 3)).astype(">u2")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + row.tobytes() for row in v)  # filter 0 on each row
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 7, 5, 16, 2, 0, 0, 0))
                                       + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    want = (v >> 8).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    assert np.array_equal(_read(root), want)
