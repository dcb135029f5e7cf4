"""Do stored views distil an augmented image student as well as the teacher in the loop?

scikit-learn's handwritten digits (8x8, 1,797 images, shipped with the package) are
written as PNG files in the ImageFolder layout (a stratified quarter held out as its
own folder) and read as ``imagefolder:DIR?size=16,gray``. A ``cnn-large`` teacher is
trained on them with ``train --augment`` (hard labels); a ``cnn`` student, ~85x cheaper
per image, is trained the same number of epochs, with augmentation ``crop(16,padding=2)``
(no flip: a mirrored 2, 3, 4, 5, 7 or 9 is no digit), by each method:

  a-hard          hard labels only, a fresh view per epoch (train --augment)
  b-single        a store of one teacher output per image (the un-augmented one), a fresh view per epoch
  c-views-V       a views store of V teacher outputs per image, the stored views replayed, V in 4, 16, 64
  d-online        the teacher in the loop on the student's view (library train(config, teacher=module))
  e-no-aug        the single-output store, no augmentation

Every store holds dense float32 logits, so (c) differs from (d) only by the finite number of views.
Reported per method, mean ± std over student seeds: held-out accuracy, top-1 agreement
with the teacher on the held-out images, and seconds per training epoch (median over
epochs, measured by the trainer). Everything runs through the library calls the CLI
makes (``softlabels.teacher.job.generate``, ``softlabels.student.trainer.train``, ``softlabels.evaluation.evaluator.evaluate``).

    python tools/experiments/views_experiment.py --out /tmp/views-exp [--seeds 3] [--epochs 20] [--teacher-epochs 15]
    python tools/experiments/views_experiment.py --quick --out DIR     # a small run (seconds), for the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softlabels.evaluation.evaluator import evaluate
from softlabels.student.config import TrainConfig
from softlabels.student.trainer import train
from softlabels.teacher.job import generate
from softlabels.teacher.spec import resolve_model

AUGMENT = "crop(16,padding=2)"
TEACHER, STUDENT = "cnn-large", "cnn"


def write_digits(root: Path, *, limit: int | None = None) -> tuple[str, str]:
    """The digits as 8-bit grayscale PNGs in ``root/{train,heldout}/<digit>/``; their two data specs."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # pixel values 0..16
    idx = np.arange(len(images))
    tr, ho = train_test_split(idx, test_size=0.25, stratify=digits.target, random_state=0)
    if limit:
        tr, ho = tr[:limit], ho[:max(limit // 3, 10)]
    for split, rows in (("train", tr), ("heldout", ho)):
        for i in rows:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return tuple(f"imagefolder:{root / s}?size=16,gray" for s in ("train", "heldout"))  # type: ignore[return-value]


def _train(out: Path, student: str, *, epochs: int, seed: int, teacher: torch.nn.Module | None = None,
           **kw: Any) -> dict[str, Any]:
    """One training run; its summary plus the median seconds per epoch the trainer measured."""
    cfg = TrainConfig(student=student, out=str(out), epochs=epochs, batch_size=64, lr=3e-3, seed=seed,
                      threads=1, device="cpu", progress=False, overwrite=True, **kw)
    summary = train(cfg, teacher=teacher)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary["epoch_seconds"] = statistics.median(r["epoch_seconds"] for r in records)
    return summary


def run(out: Path, *, seeds: int, epochs: int, teacher_epochs: int, views: tuple[int, ...],
        limit: int | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    train_spec, heldout = write_digits(out / "digits", limit=limit)
    t0 = time.perf_counter()
    teacher_run = _train(out / "teacher", TEACHER, epochs=teacher_epochs, seed=0, data=(train_spec,),
                         augment=AUGMENT)
    weights = out / "teacher" / "model.pt"
    teacher_eval = evaluate(out / "teacher", heldout, device="cpu")
    stores: dict[str, dict[str, Any]] = {}

    def store(name: str, data: str, **kw: Any) -> Path:
        path = out / "stores" / f"{name}.h5"
        r = generate(TEACHER, data, path, weights=weights, layout="dense", device="cpu", overwrite=True,
                     progress=False, **kw)
        stores[name] = {"seconds": r.seconds, "bytes": path.stat().st_size}
        return path

    held_store = store("heldout", heldout)
    single = store("single", train_spec)
    viewed = {v: store(f"views{v}", train_spec, views=v, augment=AUGMENT, seed=1) for v in views}
    info = resolve_model(TEACHER, input_shape=(1, 16, 16), num_classes=10, weights=weights)
    methods: dict[str, dict[str, Any]] = {
        "a-hard": {"data": (train_spec,), "augment": AUGMENT},
        "b-single": {"stores": (str(single),), "augment": AUGMENT},
        **{f"c-views-{v}": {"stores": (str(p),)} for v, p in viewed.items()},
        "d-online": {"data": (train_spec,), "augment": AUGMENT, "online": True},
        "e-no-aug": {"stores": (str(single),)},
    }
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in range(seeds):
        for name, kw in methods.items():
            kw = dict(kw)
            teacher = info.module if kw.pop("online", False) else None
            run_dir = out / "runs" / f"{name}-s{seed}"
            s = _train(run_dir, STUDENT, epochs=epochs, seed=seed, teacher=teacher, **kw)
            m = evaluate(run_dir, heldout, held_store, device="cpu")
            rows[name].append({"accuracy": m["accuracy"], "agreement": m["agreement"],
                               "epoch_seconds": s["epoch_seconds"], "student_flops": s["flops"]})
            print(f"{name} seed {seed}: accuracy {m['accuracy']:.4f} agreement {m['agreement']:.4f} "
                  f"{s['epoch_seconds']:.2f} s/epoch", flush=True)
    result = {
        "augment": AUGMENT, "epochs": epochs, "teacher_epochs": teacher_epochs, "seeds": seeds,
        "teacher": {"accuracy": teacher_eval["accuracy"], "flops": teacher_run["flops"],
                    "epoch_seconds": teacher_run["epoch_seconds"]},
        "student_flops": rows["a-hard"][0]["student_flops"], "stores": stores,
        "methods": {name: _stats(r) for name, r in rows.items()}, "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("accuracy", "agreement", "epoch_seconds"):
        vals = [r[key] for r in rows]
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "values": vals}
    return out


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per method)."""
    online = result["methods"]["d-online"]["epoch_seconds"]["mean"]
    lines = ["| method | held-out accuracy | agreement with teacher | s / epoch | cost vs (d) |",
             "|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        acc, agr, sec = m["accuracy"], m["agreement"], m["epoch_seconds"]
        lines.append(f"| {name} | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} % | "
                     f"{100 * agr['mean']:.2f} ± {100 * agr['std']:.2f} % | {sec['mean']:.3f} ± {sec['std']:.3f} | "
                     f"{sec['mean'] / online:.2f}x |")
    t = result["teacher"]
    lines.append(f"\nTeacher ({TEACHER}): held-out accuracy {100 * t['accuracy']:.2f} %, {t['flops']:,} "
                 f"multiply-adds per image vs the student's {result['student_flops']:,} "
                 f"({t['flops'] / result['student_flops']:.0f}x); {t['epoch_seconds']:.2f} s per training epoch.")
    lines.append("Stores (generation seconds, bytes): " + ", ".join(
        f"{k} {v['seconds']:.1f} s {v['bytes'] / 1e6:.2f} MB" for k, v in result["stores"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="a few hundred images, 2 epochs, V in 2, 4 (seconds)")
    args = ap.parse_args()
    if args.quick:
        result = run(args.out, seeds=2, epochs=2, teacher_epochs=1, views=(2, 4), limit=120)
    else:
        result = run(args.out, seeds=args.seeds, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                     views=(4, 16, 64))
    print(table(result))


if __name__ == "__main__":
    main()
