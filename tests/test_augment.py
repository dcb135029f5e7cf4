"""Augmentation ops: equal to independent references on the same params, replayed exactly, drawn in range.

Each op is checked against a plain reference that runs everywhere (numpy padding and
indexing, Pillow's resize, the affine map by its formula) and, where ``import torchvision``
succeeds, against ``torchvision.transforms.v2.functional`` as well.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softlabels.errors import DataError, SpecError
from softlabels.inputs.augment import (
    PARAM_DTYPES,
    Compose,
    RandomAffine,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ViewRandom,
    draw_views,
    param_dtype,
    parse_augment,
)
from softlabels.inputs.augment.rng import _exp


# -- the generator -----------------------------------------------------------------------------------
def _mix_ref(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _uniform_ref(seed: int, sample: int, view: int, stream: int, k: int) -> list[float]:
    """The documented hash with plain Python ints (docs/VIEWS.md, "Seeding")."""
    h = 0x9E3779B9
    for word in (seed & 0xFFFFFFFF, seed >> 32, sample & 0xFFFFFFFF, sample >> 32, view):
        h = _mix_ref(h ^ word)
    h = _mix_ref(_mix_ref(h ^ stream) ^ 0x5BD1E995)
    return [(_mix_ref(_mix_ref(h ^ j)) >> 8) / 2**24 for j in range(k)]


def test_generator_equals_plain_python_reference():
    seeds, ids, views = [0, 7, 2**40 + 3, 2**63 - 1], [0, 1, 12345, 2**33 + 5, 2**63 - 1], [0, 1, 63]
    for seed in seeds:
        for view in views:
            got = ViewRandom(seed, torch.tensor(ids), view).stream(2).uniform(5)
            want = [_uniform_ref(seed, i, view, 2, 5) for i in ids]
            assert got.tolist() == want


def test_generator_is_uniform_and_rows_differ():
    u = ViewRandom(0, torch.arange(20000), 0).stream(0).uniform(8).flatten().numpy()
    counts = np.histogram(u, bins=16, range=(0, 1))[0]
    chi2 = (((counts - u.size / 16) ** 2) / (u.size / 16)).sum()
    assert chi2 < 50, chi2  # 15 degrees of freedom: p ~ 1e-5
    assert abs(u.mean() - 0.5) < 0.01
    assert np.unique(u).size > 0.99 * u.size


def test_uniform_calls_continue_the_sequence():
    rng = ViewRandom(3, torch.arange(4), 1).stream(0)
    first, second = rng.uniform(2), rng.uniform(3)
    again = ViewRandom(3, torch.arange(4), 1).stream(0).uniform(5)
    assert torch.equal(torch.cat([first, second], 1), again)


SPECS = ["crop(32,padding=4)+flip", "rrc(24,scale=0.08-1)+flip", "affine(15,translate=0.1,scale=0.9-1.1)",
         "crop(28,padding=2,padding_mode=reflect)+rrc(20,scale=0.3-0.9,ratio=0.5-2)+affine(10,interpolation=bilinear)"]


@pytest.mark.parametrize("spec", SPECS)
def test_params_do_not_depend_on_the_batch(spec):
    aug = parse_augment(spec)
    full = draw_views(aug, 11, torch.arange(50), 6, (3, 32, 32))  # [50, 6, P]
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, 50, 37))
    views = torch.from_numpy(rng.integers(0, 6, 37))
    some = draw_views(aug, 11, ids, views, (3, 32, 32))  # another batch: shuffled, repeats, other size
    assert torch.equal(some, full[ids, views])
    for i in range(0, 50, 7):  # one row at a time
        assert torch.equal(draw_views(aug, 11, torch.tensor([i]), 6, (3, 32, 32))[0], full[i])
    assert not torch.equal(draw_views(aug, 12, torch.arange(50), 6, (3, 32, 32)), full)  # the seed matters


def test_adding_an_op_keeps_the_earlier_params():
    a = draw_views(parse_augment("crop(32,padding=4)"), 0, torch.arange(10), 4, (3, 32, 32))
    b = draw_views(parse_augment("crop(32,padding=4)+flip"), 0, torch.arange(10), 4, (3, 32, 32))
    assert torch.equal(b[..., :2], a)


@pytest.mark.gpu
def test_params_equal_on_cpu_and_cuda():
    for spec in SPECS:
        aug = parse_augment(spec)
        cpu = draw_views(aug, 5, torch.arange(300), 4, (3, 32, 32))
        gpu = draw_views(aug, 5, torch.arange(300, device="cuda"), 4, (3, 32, 32))
        assert torch.equal(cpu, gpu.cpu())
        x = torch.rand(64, 3, 32, 32)
        p = cpu[:16].reshape(64, -1)
        torch.testing.assert_close(aug.apply(x.cuda(), p.cuda()).cpu(), aug.apply(x, p), atol=1e-5, rtol=0)


def test_exact_exp_matches_math_exp():
    t = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    want = torch.tensor([math.exp(v) for v in t.tolist()], dtype=torch.float64)
    assert ((_exp(t) - want).abs() / want).max() < 1e-14


# -- the ops equal independent references on the same params -----------------------------------------
def _images(n: int = 12, c: int = 3, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _draw(op, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return Compose([op]).draw(ViewRandom(seed, torch.arange(len(x)), 0), tuple(x.shape[-2:]))


class Plain:
    """References that need nothing but numpy and Pillow: one image [C, H, W] at a time."""

    name = "plain"

    def pad_crop(self, img, pad, fill, mode, top, left, h, w):
        kw = {"constant_values": fill} if mode == "constant" else {}
        padded = np.pad(img.numpy(), ((0, 0), (pad, pad), (pad, pad)), mode=mode, **kw)  # numpy's names are ours
        return torch.from_numpy(padded[:, top:top + h, left:left + w].copy())

    def hflip(self, img):
        return torch.from_numpy(img.numpy()[:, :, ::-1].copy())

    def resized_crop(self, img, top, left, h, w, size):
        """Pillow's antialiased bilinear resize of the cropped window, channel by channel (mode F)."""
        Image = pytest.importorskip("PIL.Image")
        window = img.numpy()[:, top:top + h, left:left + w]
        return torch.from_numpy(np.stack([
            np.asarray(Image.fromarray(np.ascontiguousarray(ch)).resize((size[1], size[0]), Image.BILINEAR))
            for ch in window]))

    def affine(self, img, angle, tx, ty, scale, interpolation, fill):
        """Output pixel q (centred coordinates) shows the input at R(-angle) (q - t) / scale, in float64:
        the nearest pixel (halves to even; outside the input: ``fill``), or bilinear, blended with
        ``fill`` by the share of its four pixels' weight outside the input (torchvision's rule)."""
        h, w = img.shape[-2:]
        a = img.numpy().astype(np.float64)
        rot = math.radians(angle)
        cos, sin = math.cos(rot), math.sin(rot)
        yc, xc = np.mgrid[0:h, 0:w].astype(np.float64)
        xc, yc = xc - (w - 1) / 2 - tx, yc - (h - 1) / 2 - ty
        sx = (cos * xc + sin * yc) / scale + (w - 1) / 2  # source pixel coordinates
        sy = (-sin * xc + cos * yc) / scale + (h - 1) / 2

        def at(iy, ix):  # pixel values (0 outside) and whether each lies inside
            inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            return np.where(inside, a[:, iy.clip(0, h - 1), ix.clip(0, w - 1)], 0.0), inside

        if interpolation == "nearest":
            value, inside = at(np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64))
            tie = (np.abs(sx - np.floor(sx) - 0.5) < 1e-4) | (np.abs(sy - np.floor(sy) - 0.5) < 1e-4)
            out = np.where(inside, value, fill)
            return torch.from_numpy(out).float(), torch.from_numpy(~tie)  # a float32 grid may round ties either way
        x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
        fx, fy = sx - x0, sy - y0
        value, share = 0.0, 0.0
        for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            v, inside = at(y0 + dy, x0 + dx)
            value, share = value + weight * v, share + weight * inside
        # At the border torchvision blends the zero-padded value with fill by the footprint's share inside.
        out = share * value + (1 - share) * fill
        return torch.from_numpy(out).float(), torch.ones(h, w, dtype=torch.bool)


class Torchvision:
    """torchvision.transforms.v2.functional on the same parameters."""

    name = "torchvision"

    def __init__(self):
        pytest.importorskip("torchvision")
        from torchvision.transforms.v2 import functional

        self.F = functional

    def pad_crop(self, img, pad, fill, mode, top, left, h, w):
        padded = self.F.pad(img, [pad] * 4, fill=fill if mode == "constant" else None, padding_mode=mode)
        return self.F.crop(padded, top, left, h, w)

    def hflip(self, img):
        return self.F.hflip(img)

    def resized_crop(self, img, top, left, h, w, size):
        return self.F.resized_crop(img, top, left, h, w, list(size), antialias=True)

    def affine(self, img, angle, tx, ty, scale, interpolation, fill):
        out = self.F.affine(img, angle=angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                            interpolation=self.F.InterpolationMode(interpolation), fill=fill)
        return out, torch.ones(img.shape[-2:], dtype=torch.bool)


@pytest.fixture(params=["plain", "torchvision"])
def ref(request):
    """The plain reference everywhere; torchvision's functional ops where torchvision imports."""
    return Plain() if request.param == "plain" else Torchvision()


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
def test_crop_equals_pad_and_crop(ref, mode):
    x = _images()
    op = RandomCrop((16, 22), padding=3, fill=0.25, padding_mode=mode)
    p = _draw(op, x)
    got = op.apply(x, p)
    for b in range(len(x)):
        want = ref.pad_crop(x[b], 3, 0.25, mode, int(p[b, 0]), int(p[b, 1]), 16, 22)
        assert torch.equal(got[b], want)  # a copy of pixels: exactly equal


def test_flip_equals_a_mirror(ref):
    x = _images()
    p = _draw(RandomHorizontalFlip(), x)
    assert 0 < p.sum() < len(x)
    got = RandomHorizontalFlip().apply(x, p)
    for b in range(len(x)):
        assert torch.equal(got[b], ref.hflip(x[b]) if p[b, 0] else x[b])


@pytest.mark.parametrize("size", [(16, 16), (32, 40), (20, 24)])
def test_resized_crop_equals_an_antialiased_bilinear_resize(ref, size):
    """Down- and upscaling, and crops of the output size (a plain copy).

    The same triangle filter as Pillow's and torchvision's antialiased bilinear resize, its
    weights summed in another order (and Pillow keeps its first pass in float32), so the images
    agree to float32 rounding: atol 2e-6 on values in [0, 1] (torchvision 1.8e-7 measured,
    Pillow 1.3e-6); a crop the size of the output is copied exactly.
    """
    x = _images(24)
    op = RandomResizedCrop(size, scale=(0.1, 1.0))
    p = _draw(op, x, seed=1)
    if size[0] <= 20 and size[1] <= 24:  # one crop of the output size
        p[0] = torch.tensor([20 - size[0], (24 - size[1]) // 2, size[0], size[1]])
    got = op.apply(x, p)
    for b in range(len(x)):
        top, left, h, w = (int(v) for v in p[b])
        want = ref.resized_crop(x[b], top, left, h, w, size)
        torch.testing.assert_close(got[b], want, atol=2e-6, rtol=0)
        if (h, w) == size:
            assert torch.equal(got[b], want)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_affine_equals_the_inverse_map(ref, interpolation, fill):
    """Against the formula in float64: nearest equal wherever the source is not within 1e-4 of a
    half pixel (a float32 grid may round those either way: 3 of 7,680 pixels here), bilinear to
    float32 rounding of the grid (atol 1e-5; 3.5e-6 measured). Against torchvision (the same inverse matrix, grid and grid_sample call):
    float32 rounding of the batched grid product (bit for bit on this machine; atol 1e-6)."""
    x = _images(16)
    op = RandomAffine((-30.0, 30.0), (0.2, 0.1), (0.8, 1.2), interpolation, fill)
    p = _draw(op, x, seed=2)
    got = op.apply(x, p)
    atol = 1e-6 if ref.name == "torchvision" else 1e-5
    ties = 0
    for b in range(len(x)):
        angle, tx, ty, scale = p[b].tolist()
        want, clear = ref.affine(x[b], angle, tx, ty, scale, interpolation, fill)
        torch.testing.assert_close(got[b][:, clear], want[:, clear], atol=atol, rtol=0)
        ties += int((~clear).sum())
    assert ties < 0.001 * x[0, 0].numel() * len(x)


def test_compose_applies_in_order():
    x = _images()
    aug = parse_augment("crop(16,padding=2)+flip")
    p = draw_views(aug, 0, torch.arange(len(x)), torch.zeros(len(x), dtype=torch.int64), (3, 20, 24))
    want = aug.ops[1].apply(aug.ops[0].apply(x, p[:, :2]), p[:, 2:])
    assert torch.equal(aug.apply(x, p), want)
    assert aug.apply(x, p).shape == (len(x), 3, 16, 16)


# -- params lie in their documented ranges ----------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 64), w=st.integers(1, 64), pad=st.integers(0, 8), data=st.data())
def test_crop_params_in_range(h, w, pad, data):
    ch, cw = data.draw(st.integers(1, h + 2 * pad)), data.draw(st.integers(1, w + 2 * pad))
    p = _draw(RandomCrop((ch, cw), pad), torch.zeros(40, 1, h, w), seed=data.draw(st.integers(0, 2**63 - 1)))
    assert torch.equal(p, p.round())
    assert (p >= 0).all() and (p[:, 0] <= h + 2 * pad - ch).all() and (p[:, 1] <= w + 2 * pad - cw).all()


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), lo=st.floats(0.01, 1), span=st.floats(0, 1),
       rlo=st.floats(0.2, 1), rspan=st.floats(0, 4), seed=st.integers(0, 2**63 - 1))
def test_resized_crop_params_in_range(h, w, lo, span, rlo, rspan, seed):
    p = _draw(RandomResizedCrop((8, 8), (lo, lo + span), (rlo, rlo + rspan)), torch.zeros(50, 1, h, w), seed)
    top, left, ch, cw = p.T
    assert torch.equal(p, p.round())
    assert (ch >= 1).all() and (cw >= 1).all() and (ch <= h).all() and (cw <= w).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()


@settings(max_examples=60, deadline=None)
@given(d0=st.floats(-180, 180), dspan=st.floats(0, 180), tx=st.floats(0, 1), ty=st.floats(0, 1),
       s0=st.floats(0.1, 2), sspan=st.floats(0, 1), h=st.integers(1, 100), w=st.integers(1, 100),
       seed=st.integers(0, 2**63 - 1))
def test_affine_params_in_range(d0, dspan, tx, ty, s0, sspan, h, w, seed):
    p = _draw(RandomAffine((d0, d0 + dspan), (tx, ty), (s0, s0 + sspan)), torch.zeros(50, 1, h, w), seed)
    angle, dx, dy, scale = p.double().T
    assert torch.equal(p, p.half().float())  # float16 view_params hold them exactly
    for v, lo, hi in ((angle, d0, d0 + dspan), (scale, s0, s0 + sspan)):
        tol = 2**-11 * max(abs(lo), abs(hi)) + 2**-25  # half a float16 step: only where the range holds none
        assert ((v >= lo - tol) & (v <= hi + tol)).all()
        wide = torch.tensor([lo, hi]).half().double()
        if wide[0] >= lo and wide[1] <= hi:  # both ends' nearest float16 values inside: every draw inside
            assert ((v >= lo) & (v <= hi)).all()
    assert torch.equal(dx, dx.round()) and (dx.abs() <= round(tx * w) + 1).all() and (dx.abs() <= tx * w + 0.5).all()
    assert torch.equal(dy, dy.round()) and (dy.abs() <= ty * h + 0.5).all()


@settings(max_examples=30, deadline=None)
@given(prob=st.floats(0, 1), seed=st.integers(0, 2**63 - 1))
def test_flip_params_are_flags_with_rate_p(prob, seed):
    p = _draw(RandomHorizontalFlip(prob), torch.zeros(2000, 1, 2, 2), seed)
    assert set(p.flatten().tolist()) <= {0.0, 1.0}
    assert abs(p.mean().item() - prob) < 0.06


def _rrc_reference_draws(n: int, height: int, width: int, scale, ratio, seed: int = 0) -> torch.Tensor:
    """[n, 4] boxes drawn as docs/VIEWS.md says, with numpy's generator: up to 10 tries of an area
    fraction uniform in ``scale`` and a log-uniform aspect ratio, the first that fits, else the centre."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        for _ in range(10):
            area = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                boxes.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
                break
        else:
            boxes.append(((height - min(height, width)) // 2, (width - min(height, width)) // 2, height, width))
    return torch.tensor(boxes, dtype=torch.float32)


@pytest.mark.parametrize("reference", ["plain", "torchvision"])
def test_draws_follow_the_reference_distributions(reference):
    """Our counter-based draws agree in distribution with the algorithm drawn by another generator
    (numpy's), and, where torchvision imports, with its own make_params."""
    if reference == "plain":
        theirs = _rrc_reference_draws(4000, 40, 30, (0.2, 1.0), (3 / 4, 4 / 3))
    else:
        pytest.importorskip("torchvision")
        from torchvision.transforms import v2

        torch.manual_seed(0)
        x = torch.zeros(1, 40, 30)
        tv = v2.RandomResizedCrop(16, scale=(0.2, 1.0))
        theirs = torch.tensor([[*(lambda p: (p["top"], p["left"], p["height"], p["width"]))(tv.make_params([x]))]
                               for _ in range(4000)], dtype=torch.float32)
    ours = _draw(RandomResizedCrop((16, 16), (0.2, 1.0)), torch.zeros(4000, 1, 40, 30))
    assert torch.allclose(ours.mean(0), theirs.mean(0), atol=0.5), (ours.mean(0), theirs.mean(0))
    assert torch.allclose(ours.std(0), theirs.std(0), rtol=0.08), (ours.std(0), theirs.std(0))


# -- the spec grammar -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, ops", [
    ("crop(32,padding=4)+flip", [RandomCrop((32, 32), 4), RandomHorizontalFlip()]),
    ("rrc(224,scale=0.08-1)+flip(p=0.3)", [RandomResizedCrop((224, 224)), RandomHorizontalFlip(0.3)]),
    ("rrc(28x32, scale=0.5-1, ratio=0.5-2)", [RandomResizedCrop((28, 32), (0.5, 1.0), (0.5, 2.0))]),
    ("affine(15,translate=0.1x0.2,scale=0.9-1.1)", [RandomAffine((-15.0, 15.0), (0.1, 0.2), (0.9, 1.1))]),
    ("affine(degrees=-5-10,interpolation=bilinear,fill=1)", [RandomAffine((-5.0, 10.0), interpolation="bilinear",
                                                                          fill=1.0)]),
    (" crop(8, padding_mode=edge, padding=1) ", [RandomCrop((8, 8), 1, padding_mode="edge")]),
])
def test_spec_parses_to_ops_and_back(spec, ops):
    aug = parse_augment(spec)
    assert aug.ops == ops
    assert parse_augment(aug.spec) == aug


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(
    st.builds(RandomCrop, st.tuples(st.integers(1, 99), st.integers(1, 99)), st.integers(0, 9),
              st.floats(-2, 2), st.sampled_from(["constant", "edge", "reflect"])),
    st.builds(RandomHorizontalFlip, st.floats(0, 1)),
    st.builds(RandomResizedCrop, st.tuples(st.integers(1, 99), st.integers(1, 99)),
              st.tuples(st.floats(0.01, 0.5), st.floats(0.5, 1)), st.tuples(st.floats(0.1, 1), st.floats(1, 10))),
    st.builds(RandomAffine, st.tuples(st.floats(-90, 0), st.floats(0, 90)),
              st.tuples(st.floats(0, 1), st.floats(0, 1)), st.tuples(st.floats(0.1, 1), st.floats(1, 3)),
              st.sampled_from(["nearest", "bilinear"]), st.floats(-1, 1)),
), min_size=1, max_size=4))
def test_canonical_spec_round_trips(ops):
    aug = Compose(ops)
    assert parse_augment(aug.spec) == aug


@pytest.mark.parametrize("spec, needle", [
    ("crop(32", "cannot parse 'crop(32'"),
    ("blur(3)", "unknown augmentation 'blur'"),
    ("crop(32)++flip", "has an empty term"),
    ("crop(32,pad=4)", "has no argument 'pad'"),
    ("crop(32,padding=4,padding=2)", "repeats argument 'padding'"),
    ("crop(padding=4)", "lacks its size"),
    ("crop(0)", "'0' is not a whole number >= 1"),
    ("flip(p=2)", "p=2 is not a probability"),
    ("rrc(32,scale=1-0.5)", "runs backwards"),
    ("affine(10,interpolation=cubic)", "is not nearest or bilinear"),
    ("crop(32,padding_mode=wrap)", "padding_mode 'wrap' is not one of"),
    ("no_such_module_zz:make", "cannot import module 'no_such_module_zz'"),
])
def test_bad_specs_say_what_is_wrong(spec, needle):
    with pytest.raises(SpecError, match=None) as info:
        parse_augment(spec)
    assert needle in str(info.value) and spec.strip() in str(info.value)


def test_crop_larger_than_the_input_is_refused():
    with pytest.raises(DataError, match="needs inputs of at least 40x40 after padding"):
        draw_views(parse_augment("crop(40,padding=2)"), 0, torch.arange(3), 2, (3, 32, 32))
    with pytest.raises(DataError, match=r"needs image inputs \[C, H, W\]"):
        draw_views(parse_augment("flip"), 0, torch.arange(3), 2, (64,))


# -- user augmentations ------------------------------------------------------------------------------
USER_OP = '''
import torch

class Brightness:
    """Multiply by a factor uniform in [lo, hi] (the docs/VIEWS.md example)."""
    num_params = 1

    def __init__(self, lo=0.8, hi=1.2):
        self.lo, self.hi = lo, hi
        self.spec = f"{__name__}:make"

    def output_size(self, size):
        return size

    def draw(self, rng, size):
        return (self.lo + rng.uniform(1) * (self.hi - self.lo)).float()

    def apply(self, x, params):
        return x * params[:, :1, None, None].to(x.dtype)

def make():
    return Brightness()

class NoApply:
    num_params = 1
    spec = "x"

def broken():
    return NoApply()

def wrong_shape():
    op = Brightness()
    op.draw = lambda rng, size: torch.zeros(rng.n, 3)
    return op

def bad_dtype():
    op = Brightness()
    op.param_dtype = lambda size: "int4"
    return op
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "aug_user_zz.py").write_text(USER_OP)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "aug_user_zz"


def test_user_op_composes_with_builtins(user_module):
    aug = parse_augment(f"crop(16,padding=2)+{user_module}:make")
    assert aug.num_params == 3 and aug.spec == f"crop(16,padding=2)+{user_module}:make"
    x = _images(6)
    p = draw_views(aug, 0, torch.arange(6), 2, (3, 20, 24))[:, 0]
    assert ((p[:, 2] >= 0.8) & (p[:, 2] < 1.2)).all()
    assert torch.equal(aug.apply(x, p), aug.ops[0].apply(x, p[:, :2]) * p[:, 2, None, None, None])


def test_user_op_without_the_protocol_is_refused(user_module):
    with pytest.raises(SpecError, match="lacks output_size, draw, apply"):
        parse_augment(f"{user_module}:broken")
    with pytest.raises(DataError, match=r"drew params \(4, 3\), not \[4, 1\]"):
        draw_views(parse_augment(f"{user_module}:wrong_shape"), 0, torch.arange(4), torch.zeros(4), (3, 8, 8))


# -- the catalogued errors (docs/ERRORS.md section 14), raised through the library ------------------
def _user_op(name: str):
    return lambda: parse_augment(f"aug_user_zz:{name}")


ERROR_CASES = {
    "E1408": lambda: parse_augment("crop(32"),
    "E1409": lambda: parse_augment("blur(3)+flip"),
    "E1410": lambda: parse_augment("crop(32)++flip"),
    "E1411": lambda: parse_augment("crop(32,pad=4)"),
    "E1412": lambda: parse_augment("crop(padding=4)"),
    "E1413": lambda: parse_augment("flip(p=2)"),
    "E1414": _user_op("broken"),
    "E1415": lambda: draw_views(_user_op("wrong_shape")(), 0, torch.arange(4), torch.zeros(4), (3, 8, 8)),
    "E1416": lambda: parse_augment("flip").apply(torch.zeros(2, 1, 4, 4), torch.zeros(2, 3)),
    "E1417": lambda: draw_views(parse_augment("crop(40,padding=2)"), 0, torch.arange(3), 2, (3, 32, 32)),
    "E1418": lambda: draw_views(parse_augment("flip"), 0, torch.arange(3), 2, (64,)),
    "E1419": lambda: draw_views(parse_augment("crop(8,padding=4,padding_mode=reflect)"), 0, torch.arange(3), 2,
                                (3, 4, 8)),
    "E1782": lambda: draw_views(_user_op("bad_dtype")(), 0, torch.arange(3), 2, (3, 8, 8)),
}


@pytest.mark.parametrize("cid", sorted(ERROR_CASES))
def test_errors_match_the_catalogue(cid, user_module):
    from tests.test_errors import ROWS, assert_classes, assert_message

    with pytest.raises(Exception) as info:
        ERROR_CASES[cid]()
    assert_message(ROWS[cid], str(info.value))
    assert_classes(ROWS[cid], info.value)


def test_docs_examples_run(tmp_path, monkeypatch):
    """docs/VIEWS.md: the opening example and the user op, as written there."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "VIEWS.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    scope: dict = {}
    exec(blocks[0], scope)  # noqa: S102 - our own documentation
    assert scope["params"].shape == (8, 4, 3) and scope["view0"].shape == (8, 3, 32, 32)
    (tmp_path / "mypackage").mkdir()
    (tmp_path / "mypackage" / "__init__.py").write_text("")
    (tmp_path / "mypackage" / "augs.py").write_text(blocks[1])
    monkeypatch.syspath_prepend(str(tmp_path))
    aug = parse_augment("crop(32,padding=4)+flip+mypackage.augs:Brightness")
    assert aug.num_params == 4 and aug.spec.endswith("+mypackage.augs:Brightness")
    p = draw_views(aug, 0, torch.arange(5), 3, (3, 32, 32))
    assert ((p[..., 3] >= 0.8) & (p[..., 3] < 1.2)).all()
    assert aug.apply(torch.ones(5, 3, 32, 32), p[:, 0]).shape == (5, 3, 32, 32)


def _narrowest(values: torch.Tensor) -> str:
    """The narrowest storage dtype that holds ``values`` exactly, worked out from the values alone."""
    whole = torch.equal(values, values.round())
    if whole and values.min() >= 0 and values.max() <= 255:
        return "uint8"
    return "float16" if torch.equal(values, values.half().float()) else "float32"


@settings(max_examples=40, deadline=None)
@given(size=st.integers(4, 3000), pad=st.integers(0, 300), spec=st.sampled_from(["crop", "rrc", "affine", "flip"]),
       seed=st.integers(0, 2**63 - 1))
def test_param_dtype_holds_every_draw_exactly(size, pad, spec, seed):
    """Each op's param_dtype: draws round-trip through it, and it is no wider than its bounds need."""
    op = {"crop": RandomCrop((4, 4), padding=pad), "rrc": RandomResizedCrop((4, 4)),
          "affine": RandomAffine((-30.0, 30.0), (0.5, 0.5), (0.7, 1.3)), "flip": RandomHorizontalFlip()}[spec]
    hw = (size, max(4, size // 3))
    dtype = param_dtype(Compose([op]), hw)
    p = Compose([op]).draw(ViewRandom(seed, torch.arange(64), 0), hw)
    assert torch.equal(p.to(getattr(torch, dtype)).float(), p)
    bound = {"crop": max(hw) + 2 * pad - 4, "rrc": max(hw), "affine": round(0.5 * max(hw)) + 1, "flip": 1}[spec]
    if spec == "affine":
        assert dtype == ("float16" if bound <= 2048 else "float32")
    else:
        assert dtype == ("uint8" if bound <= 255 else "float16" if bound <= 2048 else "float32")
    assert PARAM_DTYPES.index(_narrowest(p)) <= PARAM_DTYPES.index(dtype)


def test_draw_views_rounds_a_user_op_to_the_dtype_it_declares():
    class Half:  # declares float16 but draws values float16 cannot hold
        num_params, spec = 1, "half"

        def output_size(self, size):
            return size

        def draw(self, rng, size):
            return rng.uniform(1).float()

        def apply(self, x, params):
            return x

        def param_dtype(self, size):
            return "float16"

    p = draw_views(Compose([Half()]), 0, torch.arange(16), 2, (1, 4, 4))
    assert param_dtype(Compose([Half()]), (4, 4)) == "float16" and torch.equal(p, p.half().float())
    assert param_dtype(Compose([Half(), RandomAffine()]), (4, 4)) == "float16"
    Half.param_dtype = lambda self, size: "float32"
    assert param_dtype(Compose([Half(), RandomCrop((4, 4))]), (4, 4)) == "float32"
    del Half.param_dtype  # an op without the method: float32
    assert param_dtype(Compose([Half(), RandomHorizontalFlip()]), (4, 4)) == "float32"
