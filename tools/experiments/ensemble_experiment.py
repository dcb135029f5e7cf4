#!/usr/bin/env python
"""Distilling an ensemble of teachers vs each teacher alone, on the digits (docs/EXPERIMENTS.md).

Teachers: ``--teachers`` ``mlp-large`` models trained on ``digits:train`` with different seeds
(``softlabels train``), their logits for the transfer set ``digits:pool`` stored once
(``softlabels generate``). Ensembles: ``softlabels merge`` of all teacher stores, arithmetic
(at T) and geometric. Students (``mlp``, labels never used: alpha = 0) are distilled at T from
each single teacher's store and from each merged store, ``--seeds`` seeds each; accuracy on
``digits:test`` and agreement with the student's own teacher (for an ensemble: the ensemble's
prediction) are reported as mean ± std.

Students are trained in this process through the store-source API (``read_unit`` + the
layout's ``decode`` + the library's KD loss): every target, single or ensemble, goes through
the same loop. The script also measures the top-k combination's tail approximation against
the exact dense combination of the same teachers.

    python tools/experiments/ensemble_experiment.py [--teachers 4] [--seeds 3] [--out runs/ensemble]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, for demo.py
from demo import Runner  # noqa: E402  (the demo's subprocess runner: logs and timings)


def read_all(store) -> tuple[object, np.ndarray]:
    """Every unit of a store-source as one typed target, and the sample ids."""
    blocks = [store.read_unit(u) for u in range(store.meta.num_units)]
    layout = store.meta.layout_obj()
    arrays = {k: np.concatenate([b[k] for b in blocks]) for k in layout.arrays()}
    return layout.decode(arrays), np.concatenate([b["sample_ids"] for b in blocks])


def take(target, idx):
    return replace(target, **{f.name: getattr(target, f.name)[idx] for f in fields(target)})


def distil(store, temperature: float, seed: int, epochs: int, x_test, y_test):
    """Train an ``mlp`` student from ``store`` at T; its test predictions."""
    import torch

    from softlabels.inputs.digits import load_digits_split
    from softlabels.store.ensemble import check_temperature
    from softlabels.student.losses import DistillationLoss, make_soft_loss
    from softlabels.teacher.models import build_model

    check_temperature(store.meta, temperature, str(store.path))
    target, ids = read_all(store)
    x, _ = load_digits_split("pool").get_batch(ids)
    torch.manual_seed(seed)
    model = build_model("mlp", (64,), 10)
    loss = DistillationLoss(make_soft_loss(store.meta.layout_obj().default_loss, temperature), alpha=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    no_labels = torch.full((len(ids),), -1)
    for _ in range(epochs):
        for idx in torch.randperm(len(ids), generator=g).split(64):
            opt.zero_grad()
            loss(model(x[idx]), {"target": take(target, idx), "labels": no_labels[idx]}).backward()
            opt.step()
    with torch.no_grad():
        return model.eval()(x_test).argmax(1).numpy()


def teacher_logits(run: Path, x) -> np.ndarray:
    import torch

    from softlabels.teacher.models import build_model

    model = build_model("mlp-large", (64,), 10)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    with torch.no_grad():
        return model.eval()(x).double()


def _seen_at(target, t: float):
    """The stored classes' probabilities a top-k loss sees at T (K stored classes + one tail bucket)."""
    import torch

    v, lse = target.values.double(), target.logsumexp.double()
    log_tail = torch.log((-torch.expm1(v.logsumexp(-1) - lse)).clamp_min(1e-300))
    return torch.softmax(torch.cat([v, (lse + log_tail)[:, None]], 1) / t, -1)[:, :-1]


def topk_error(stores, ks: tuple[int, ...], temperatures: tuple[float, ...]) -> list[dict]:
    """Mean |error| of the probabilities a top-k loss sees on the stored classes, vs the exact dense values:
    the ensemble's combination of top-k targets, and one teacher's own top-k target (the baseline)."""
    import torch

    from softlabels.store.ensemble import Combination, combine
    from softlabels.store.layouts import make_layout

    dense = [read_all(s)[0] for s in stores]
    rows = []
    for k in ks:
        topk = make_layout("topk", num_classes=10, k=k)
        sparse = [topk.decode({n: a.numpy() for n, a in topk.encode(d.logits).items()}) for d in dense]
        for t in temperatures:
            row = {"k": k, "T": t}
            for mode in ("arithmetic", "geometric"):
                how = Combination(mode, None, t)
                tt = t if mode == "arithmetic" else 1.0  # geometric targets are made at T = 1, softened by the loss
                exact = torch.softmax(combine(dense, how, 10).logits.double() / tt, -1)
                got = combine(sparse, how, 10)
                row[mode] = float((_seen_at(got, tt) - exact.gather(1, got.ids)).abs().mean())
            single = torch.softmax(dense[0].logits.double() / t, -1).gather(1, sparse[0].ids)
            row["single teacher"] = float((_seen_at(sparse[0], t) - single).abs().mean())
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("runs/ensemble"))
    a = p.parse_args(argv)
    import torch

    from softlabels.inputs.digits import load_digits_split
    from softlabels.store.reader import UnitStore, open_store

    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    sl = Runner(a.out, verbose=True)
    common = ["--device", "cpu", "--overwrite", "--no-progress"]
    for t in range(a.teachers):
        sl(f"teacher {t}", f"teacher{t}", "train", "--student", "mlp-large", "--data", "digits:train", "--epochs", "40",
           "--batch-size", "32", "--lr", "3e-3", "--seed", str(t), "--out", f"teacher{t}", *common)
        sl(f"teacher {t} logits for digits:pool", f"generate{t}", "generate", "--teacher", "mlp-large", "--weights",
           f"teacher{t}/model.pt", "--data", "digits:pool", "--out", f"teacher{t}.zarr", *common[:3])
    stores = [f"teacher{t}.zarr" for t in range(a.teachers)]
    flags = [x for s in stores for x in ("--store", s)]
    sl("merge, arithmetic", "merge-arith", "merge", *flags, "--out", "arithmetic.zarr", "--temperature",
       str(a.temperature), "--overwrite")
    sl("merge, geometric", "merge-geo", "merge", *flags, "--out", "geometric.zarr", "--mode", "geometric",
       "--overwrite")

    x_test, y_test = load_digits_split("test").get_batch(np.arange(359))
    y_test = y_test.numpy()
    zt = [teacher_logits(a.out / f"teacher{t}", x_test) for t in range(a.teachers)]
    arith = torch.stack([torch.softmax(z / a.temperature, -1) for z in zt]).mean(0).argmax(1).numpy()
    geo = torch.stack(zt).mean(0).argmax(1).numpy()
    refs = {f"teacher {t}": zt[t].argmax(1).numpy() for t in range(a.teachers)}
    refs.update({"ensemble, arithmetic": arith, "ensemble, geometric": geo})
    sources = {f"teacher {t}": open_store(a.out / s) for t, s in enumerate(stores)}
    sources["ensemble, arithmetic"] = UnitStore(a.out / "arithmetic.zarr")
    sources["ensemble, geometric"] = UnitStore(a.out / "geometric.zarr")
    rows = {}
    for name, store in sources.items():
        acc, agree = [], []
        for seed in range(a.seeds):
            pred = distil(store, a.temperature, seed, a.epochs, x_test, y_test)
            acc.append(float((pred == y_test).mean()))
            agree.append(float((pred == refs[name]).mean()))
        rows[name] = {"teacher_accuracy": float((refs[name] == y_test).mean()), "student_accuracy": acc,
                      "agreement": agree}
        print(f"{name:<22} teacher {rows[name]['teacher_accuracy']:.4f}  student {np.mean(acc):.4f} ± "
              f"{np.std(acc):.4f}  agreement {np.mean(agree):.4f} ± {np.std(agree):.4f}")
    tail = topk_error([sources[f"teacher {t}"] for t in range(a.teachers)], (2, 5), (1.0, a.temperature))
    print("mean |error| of the probabilities a top-k loss sees, vs dense:")
    for r in tail:
        print(f"  K={r['k']} T={r['T']:g}: arithmetic {r['arithmetic']:.2e}, geometric {r['geometric']:.2e}, "
              f"single teacher {r['single teacher']:.2e}")
    singles = [np.mean(rows[f"teacher {t}"]["student_accuracy"]) for t in range(a.teachers)]
    print(f"mean single-teacher student: {np.mean(singles):.4f} (teachers' students range {min(singles):.4f}.."
          f"{max(singles):.4f})")
    (a.out / "ensemble.json").write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "rows": rows,
                                                     "topk_tail": tail}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
