"""Trained weights pinned bit for bit: a few steps of each kind of run, its weights digest recorded.

The digests were recorded with the trainer as it stood before the classifier and language-model
trainers became one core (and their two datasets one), so a refactoring that changes what a
run learns, by one bit of one weight, fails here. Re-pinned once on purpose (issue 21): v2-sampled
(the sampled estimator's weights counts / S computed directly, not as a softmax of log counts: the
same value to rounding) and the three language-model runs without --temperature (token stores now
default to the T they answer, 1, where they ran at 2 with a top-k tail softened as one class or
sampled draws re-weighted from T = 1). Everything is made in the test: tiny stores
of both formats (format 1 from tests/fixtures/v1), a tiny MLP or GPT, one thread.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from softlabels.student.config import TrainConfig
from softlabels.student.trainer import train
from tests._lmstore import ragged_data, tiny_teacher, write_token_store
from tests._v2stores import Teacher, make_images, write_v2

FIXTURES = Path(__file__).parent / "fixtures" / "v1"

# name -> sha256 of the trained student's state_dict (``weights_digest``), first 16 hex digits
PINNED = {
    "v2-dense": "c6961d8bc74dc498",
    "v2-topk-fp16": "22f74624d9e62c3b",
    "v2-sampled": "2e0763556fd2a153",
    "v2-dense-2-workers": "e855ff0a4c23ff39",
    "v2-two-stores": "805202d9c262ce34",
    "v2-ensemble": "c6961d8bc74dc498",
    "views-dense": "807aa1c23a5a3abc",
    "views-topk-k2": "ddc4f007eab02e4a",
    "augment-hard": "60015fc58058bd20",
    "hard-labels-val": "d12f95f7b5c03cce",
    "online-teacher": "cd746bf0cddf761a",
    "init-from-run": "be324c47048452ec",
    "v1-dense-h5": "6f3b423d547a2949",
    "v1-topk-zarr": "b5b778647353f800",
    "v1-sharded-zarr": "b8b8d334dbb2ad89",  # streamed by shards, its write units, as format 2 is
    "lm-dense": "31757af95be69374",
    "lm-topk-renormalize": "62d750b7d9d295fa",
    "lm-sampled-2-workers": "07317a6c60d09f17",
    "lm-jsd-sgd": "a997bb5d1a2675e6",
}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("pinned")
    images = make_images(tmp, n=40)
    more = make_images(tmp, n=24, name="more.npz")
    out = {"images": images, "more": more, "dir": str(tmp)}
    for layout in ("dense", "topk", "sampled"):
        write_v2(tmp / f"{layout}.h5", images, layout=layout, dtype="float16" if layout == "topk" else "float32")
        out[layout] = str(tmp / f"{layout}.h5")
    write_v2(tmp / "more.zarr", more)
    write_v2(tmp / "dense2.zarr", images)
    out["more-store"], out["dense2"] = str(tmp / "more.zarr"), str(tmp / "dense2.zarr")
    write_v2(tmp / "views.zarr", images, positions="views", views=3)
    write_v2(tmp / "views-topk.h5", images, positions="views", layout="topk", views=3, dtype="float16")
    out["views"], out["views-topk"] = str(tmp / "views.zarr"), str(tmp / "views-topk.h5")
    spec, data = ragged_data(tmp / "tok.npz", [5, 1, 9, 3, 7, 2, 8, 4, 6], 40, mask=True)
    teacher = tiny_teacher(40, 16)
    for layout in ("dense", "topk", "sampled"):
        out[f"lm-{layout}"] = write_token_store(tmp / f"lm-{layout}.h5", teacher, data, layout, spec=spec)
    return out


def _images(made, name: str, **kw) -> TrainConfig:
    opts = dict(student="mlp", out=str(Path(made["dir"]) / "runs" / name), epochs=2, batch_size=8, lr=1e-2,
                temperature=2.0, alpha=0.3, progress=False, overwrite=True)
    opts.update(kw)
    return TrainConfig(**opts)


def _lm(made, name: str, store: str, **kw) -> TrainConfig:
    opts = dict(student="gpt-tiny", stores=(store,), out=str(Path(made["dir"]) / "runs" / name), epochs=2,
                batch_size=4, lr=3e-3, alpha=0.2, device="cpu", progress=False, overwrite=True)
    opts.update(kw)
    return TrainConfig(**opts)


def _v1(made, name: str, store: str, **kw) -> TrainConfig:
    return _images(made, name, stores=(str(FIXTURES / store),), data=(str(FIXTURES / "inputs.npz"),), **kw)


def _runs(made) -> dict[str, tuple[TrainConfig, dict]]:
    hard = dict(alpha=None, temperature=None)
    return {
        "v2-dense": (_images(made, "a", stores=(made["dense"],)), {}),
        "v2-topk-fp16": (_images(made, "b", stores=(made["topk"],), temperature=1.0), {}),
        "v2-sampled": (_images(made, "c", stores=(made["sampled"],), temperature=1.0, alpha=0.5), {}),
        "v2-dense-2-workers": (_images(made, "d", stores=(made["dense"],), num_workers=2, loss="jsd"), {}),
        "v2-two-stores": (_images(made, "e", stores=(made["dense"], made["more-store"]), batch_size=6), {}),
        "v2-ensemble": (_images(made, "f", ensemble=(made["dense"], made["dense2"]),
                                ensemble_mode="geometric"), {}),
        "views-dense": (_images(made, "g", stores=(made["views"],), optimizer="sgd", schedule="constant"), {}),
        "views-topk-k2": (_images(made, "h", stores=(made["views-topk"],), views_per_sample=2, temperature=1.0,
                                  warmup_steps=3), {}),
        "augment-hard": (_images(made, "i", data=(made["images"],), augment="crop(6,padding=1)+flip", **hard), {}),
        "hard-labels-val": (_images(made, "j", data=(made["images"], made["more"]), val_data=made["more"], **hard),
                            {}),
        "online-teacher": (_images(made, "k", data=(made["images"],)), {"teacher": Teacher()}),
        "v1-dense-h5": (_v1(made, "m", "dense.h5"), {}),
        "v1-topk-zarr": (_v1(made, "n", "topk.zarr", temperature=1.0), {}),
        "v1-sharded-zarr": (_v1(made, "o", "sharded.zarr", batch_size=5), {}),
        "lm-dense": (_lm(made, "p", made["lm-dense"], temperature=2.0), {}),
        "lm-topk-renormalize": (_lm(made, "q", made["lm-topk"], topk_renormalize=True), {}),
        "lm-sampled-2-workers": (_lm(made, "r", made["lm-sampled"], num_workers=2, batch_size=3), {}),
        "lm-jsd-sgd": (_lm(made, "s", made["lm-topk"], loss="jsd", optimizer="sgd", lr=0.5, seed=3), {}),
    }


@pytest.mark.parametrize("name", [n for n in PINNED if n != "init-from-run"])
def test_weights_are_the_pinned_ones(made, name):
    config, extra = _runs(made)[name]
    torch.set_num_threads(1)
    summary = train(config, **extra)
    assert summary["weights_digest"][:16] == PINNED[name], summary["weights_digest"][:16]


def test_fine_tuning_from_a_run_is_pinned(made):
    first, _ = _runs(made)["v2-dense"]
    train(first)
    config = replace(_images(made, "l", stores=(made["topk"],), temperature=1.0), init=first.out)
    summary = train(config)
    assert summary["weights_digest"][:16] == PINNED["init-from-run"], summary["weights_digest"][:16]

