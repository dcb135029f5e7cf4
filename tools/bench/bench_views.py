"""Benchmark: views stores' bytes per view on disk, and reading them with augmentation replay.

Not a test. Images ``[N, 3, 32, 32]`` (random pixels; their values do not matter here) are
labelled by a random ``cnn`` teacher with ``generate --views V --augment
'crop(32,padding=4)+flip'`` at the views default (top-5) with `--dtype float16`, then:

  bytes per view: the store's size on disk / (N x V), at C = 10 and C = 1,000, HDF5 and
    Zarr side by side, and the arrays' share of it (values, ids, logsumexp, view_params)
  views/s, in-process, one thread, batch 256, in interleaved rounds (best kept):
    replay    ``SoftLabelDataset`` over the views store and the images (shuffled, checksums
              on), each batch's view built by ``augment.apply(x, view_params)``
    replay-k4 the same with ``views_per_sample=4`` (FKD: 4 stored views per input read), made
              B·4 rows by ``spread_views`` as the trainer does
    plain     a map-style ``Dataset`` whose ``__getitem__`` pads, crops and flips one image at
              random (what ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` do) in a
              ``DataLoader`` (shuffled, batch 256): a plain augmented loader, no soft labels
    batched   the same images in shuffled batches, augmented by the same batched op with
              freshly drawn params: the augmentation's own cost, no store
  and where the replay loader's time goes (cProfile, top functions by own time).

    python tools/bench/bench_views.py [--images 2048] [--views 8] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from softlabels.inputs.augment import draw_views, parse_augment
from softlabels.inputs.spec import resolve_data
from softlabels.store.reader import UnitStore
from softlabels.student.dataset import SoftLabelDataset
from softlabels.student.kinds.sample import spread_views
from softlabels.teacher import job as generate

SPEC = "crop(32,padding=4)+flip"


def make_images(path: Path, n: int, classes: int) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((n, 3, 32, 32), dtype=np.float32), y=rng.integers(0, min(classes, 10), n))
    return str(path)


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bytes_table(tmp: Path, images: int, views: int) -> None:
    print(f"bytes per view: {images} images x {views} views, '{SPEC}', top-5 (the views default), --dtype float16")
    print(f"{'C':>6} {'backend':>8} {'disk B/view':>12} {'arrays B/view':>14}  arrays (B per view)")
    for classes in (10, 1000):
        data = make_images(tmp / f"img{classes}.npz", images, classes)
        for ext in ("h5", "zarr"):
            out = tmp / f"v{classes}.{ext}"
            generate("cnn", data, out, random_teacher=True, views=views, augment=SPEC, dtype="float16",
                     num_classes=classes, batch_size=512, overwrite=True, progress=False)
            with UnitStore(out) as s:
                arrays = {k: a.dtype.itemsize * int(np.prod(a.shape)) for k, a in s.meta.arrays().items()
                          if a.family in ("position", "sample")}
            per = {k: v / (images * views) for k, v in arrays.items()}
            print(f"{classes:>6} {ext:>8} {disk_bytes(out) / (images * views):>12.1f} {sum(per.values()):>14.1f}  "
                  + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))


class PlainAugmented(Dataset):
    """One image per item, padded by 4, cropped to 32 at random and flipped at random (per item)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = F.pad(self.x[i], (4, 4, 4, 4))
        top, left = (int(v) for v in torch.randint(0, 9, (2,)))
        img = img[:, top:top + 32, left:left + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, self.y[i]


class Images(Dataset):
    """Un-augmented images, one per item (the batched reference gathers them and augments the batch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def run_replay(store: Path, data, aug, epoch: int, k: int = 1) -> int:
    ds = SoftLabelDataset([(str(store), data)], batch_size=256, seed=0, views_per_sample=k)
    ds.set_epoch(epoch)
    n = 0
    for b in ds:
        if k > 1:
            b = spread_views(b, k, ds.layout_obj)
        v = aug.apply(b["x"], b["view_params"])
        n += len(v)
    return n


def run_plain(x, y, epoch: int) -> int:
    torch.manual_seed(epoch)
    n = 0
    for v, _ in DataLoader(PlainAugmented(x, y), batch_size=256, shuffle=True):
        n += len(v)
    return n


def run_batched(x, y, aug, epoch: int) -> int:
    torch.manual_seed(epoch)
    n = 0
    for i, (v, _) in enumerate(DataLoader(Images(x, y), batch_size=256, shuffle=True)):
        ids = torch.arange(i * 256, i * 256 + len(v))
        n += len(aug.apply(v, draw_views(aug, epoch, ids, torch.zeros_like(ids), tuple(v.shape[1:]))))
    return n


def throughput(tmp: Path, images: int, views: int, rounds: int, profile: bool) -> None:
    data_path = tmp / "img10.npz"
    store = tmp / "v10.h5"
    data = resolve_data(str(data_path))
    with np.load(data_path) as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    aug = parse_augment(SPEC)
    runs = {"replay": lambda e: run_replay(store, data, aug, e),
            "replay-k4": lambda e: run_replay(store, data, aug, e, 4), "plain": lambda e: run_plain(x, y, e),
            "batched": lambda e: run_batched(x, y, aug, e)}
    best: dict[str, float] = {}
    for r in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            n = fn(r)
            best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t))
    print(f"\nviews/s, in-process, 1 thread, batch 256, {images} images (HDF5 store, C = 10), best of {rounds}:")
    for name, rate in best.items():
        print(f"  {name:>9} {rate:>12,.0f}  {rate / best['plain']:.2f}x plain")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        run_replay(store, data, aug, 99)
        prof.disable()
        print("\nreplay loader, top functions by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bytes_table(tmp, args.images, args.views)
        throughput(tmp, args.images, args.views, args.rounds, args.profile)


if __name__ == "__main__":
    main()
