"""Format-2 stores made in a test with UnitWriter directly: tiny image data and an exact linear teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from softlabels.inputs.fingerprints import fingerprint
from softlabels.inputs.augment import draw_views, parse_augment
from softlabels.inputs.spec import resolve_data
from softlabels.store.layouts import make_layout, to_numpy
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter

C, SHAPE = 4, (1, 6, 6)
LAYOUT_PARAMS = {"dense": {}, "topk": {"k": 2}, "sampled": {"samples": 8, "seed": 3}}


def make_images(tmp_path: Path, n: int = 40, name: str = "img.npz") -> str:
    """Images whose pixels are multiples of 1/8 in [0, 1]: with the teacher below every logit is exact."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 9, (n, *SHAPE)).astype(np.float32) / 8
    y = rng.integers(0, C, n)
    np.savez(tmp_path / name, x=x, y=y)
    return str(tmp_path / name)


class Teacher(torch.nn.Module):
    """A linear teacher with weights in multiples of 1/8: its float32 logits are exact sums (no rounding),
    so they are the same bits whatever the batch composition or summation order."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randint(-8, 9, (C, int(np.prod(SHAPE))), generator=g).float() / 8,
                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def write_v2(path: Path, spec: str, *, positions: str = "sample", layout: str = "dense", views: int = 3,
             augment: str = "crop(6,padding=1)+flip", dtype: str = "float32", chunk: int = 8,
             view_seed: int = 5, views_attrs: dict | None = None, source: dict | None = None) -> dict[str, np.ndarray]:
    """A complete v2 store of the teacher on ``spec`` (rows in a shuffled id order); returns what was written.

    ``views_attrs`` override entries of the recorded ``views`` attribute, ``source`` the recorded source.
    """
    ds = resolve_data(spec)
    n = len(ds)
    ids = np.random.default_rng(7).permutation(n).astype(np.int64)
    x, y = ds.get_batch(ids)
    lay = make_layout(layout, num_classes=C, logits_dtype=dtype, **LAYOUT_PARAMS[layout])
    teacher = Teacher()
    extra: dict = {}
    if positions == "views":
        aug = parse_augment(augment)
        params = draw_views(aug, view_seed, torch.from_numpy(ids), views, SHAPE)  # [N, V, P]
        with torch.no_grad():
            z = torch.stack([teacher(aug.apply(x, params[:, v])) for v in range(views)], 1)  # [N, V, C]
        extra["views"] = {"count": views, "augment": aug.spec, "seed": view_seed,
                          "param_names": [f"p{i}" for i in range(aug.num_params)], **(views_attrs or {})}
    else:
        with torch.no_grad():
            z = teacher(x)
    flat = z.reshape(-1, C)
    pos = torch.arange(len(flat))
    enc = {k: to_numpy(t).reshape((*z.shape[:-1], *to_numpy(t).shape[1:]))
           for k, t in lay.encode(flat, sample_ids=pos, positions=pos).items()}
    meta = StoreMetaV2(positions=positions, layout=layout, num_samples=n, num_classes=C, logits_dtype=dtype,
                       chunk_samples=chunk, layout_params=lay.params(), teacher={"spec": "exact-linear"},
                       source=source if source is not None else
                       {"spec": spec, "num_samples": n, "fingerprint": fingerprint(ds)}, **extra)
    arrays = {**enc, "labels": y.numpy().astype(np.int64), "sample_ids": ids}
    if positions == "views":
        arrays["view_params"] = params.numpy()
    with UnitWriter.create(path, meta) as w:
        w.write(0, **arrays)
        w.finish()
    return arrays


def write_tokens(path: Path, spec: str) -> None:
    """A complete dense ``tokens`` store of 4 samples (a language-model store), recording ``spec`` as its data."""
    from softlabels.store.positions import TokenPositions, UnitGeometry

    lengths = np.array([2, 3, 1, 2])
    tokens = TokenPositions(UnitGeometry(4, 2), lengths, chunk_positions=4)
    meta = StoreMetaV2(positions="tokens", layout="dense", num_samples=4, num_classes=C, chunk_samples=2,
                       tokens=tokens.to_attrs()["tokens"], source={"spec": spec})
    with UnitWriter.create(path, meta, lengths=lengths) as w:
        w.write(0, logits=np.zeros((int(lengths.sum()), C), np.float32), labels=np.zeros(4, np.int64),
                sample_ids=np.arange(4))
        w.finish()
