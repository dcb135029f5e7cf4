"""Compress and fine-tune a distilled student on the built-in digits; print the tables of docs/COMPRESS.md.

    PYTHONPATH=. python tools/experiments/compress_experiment.py --out runs/compress   # ~1-2 min on 2 cores

Steps (the library calls behind ``softlabels train|generate|compress``, in one process):

1. teacher ``mlp-large`` on the hard labels of ``digits:train``; its logits for
   ``digits:train``, ``digits:pool`` (unlabeled) and ``digits:test`` in three stores;
2. student ``mlp`` distilled from the train + pool stores;
3. ``compress`` of that student several ways (pruning, prune-then-distil, hidden-unit
   pruning, int8), each measured on ``digits:test`` against the teacher's test store;
4. fine-tuning (``train --init``): a student distilled from the unlabeled pool only,
   then fine-tuned on the 449 labeled training digits, against the same epochs from scratch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from softlabels.evaluation.compression import CompressConfig, compress, format_markdown  # noqa: E402
from softlabels.evaluation.evaluator import evaluate  # noqa: E402
from softlabels.student.trainer import TrainConfig, train  # noqa: E402
from softlabels.teacher.job import generate  # noqa: E402

TEST = "digits:test"
VARIANTS = {  # name -> compress options (besides run, out, data, store)
    "prune 50%": dict(prune=0.5),
    "prune 80%": dict(prune=0.8),
    "prune 80% + KD": dict(prune=0.8, finetune=True),
    "hidden units -50%": dict(prune_structured=0.5),
    "hidden units -50% + KD": dict(prune_structured=0.5, finetune=True),
    "int8 weights": dict(quantize="int8-weight"),
    "int8 dynamic": dict(quantize="int8-dynamic"),
    "hidden units -50% + KD + int8": dict(prune_structured=0.5, finetune=True, quantize="int8-weight"),
}
TEACHER_VARIANTS = {  # the same on the 300k-parameter teacher, where the matrices are large enough to time
    "prune 80%": dict(prune=0.8),
    "hidden units -50%": dict(prune_structured=0.5),
    "int8 weights": dict(quantize="int8-weight"),
    "int8 dynamic": dict(quantize="int8-dynamic"),
}


def _train(out: Path, **kw) -> dict:
    cfg = dict(student="mlp", epochs=40, batch_size=32, lr=3e-3, seed=0, device="cpu", progress=False,
               overwrite=True, out=str(out))
    return train(TrainConfig(**{**cfg, **kw}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/compress"))
    ap.add_argument("--finetune-epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add overhead on shared cores
    out, t0 = args.out, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stores = {}
    _train(out / "teacher", student="mlp-large", data=("digits:train",), epochs=30)
    for data, name in (("digits:train", "train.h5"), ("digits:pool?unlabeled", "pool.h5"), (TEST, "test.h5")):
        stores[name] = str(out / name)
        generate("mlp-large", data, stores[name], weights=out / "teacher" / "model.pt", device="cpu",
                 overwrite=True, progress=False)
    kd = (stores["train.h5"], stores["pool.h5"])
    _train(out / "student", stores=kd, temperature=1.0, alpha=0.5)

    results, tables = {}, []
    for who, variants in (("student", VARIANTS), ("teacher", TEACHER_VARIANTS)):
        rows = []
        for i, (name, opts) in enumerate(variants.items()):
            finetune = kd if opts.pop("finetune", False) else ()
            res = compress(CompressConfig(
                run=str(out / who), out=str(out / f"compressed-{who}-{i}"), data=TEST, store=stores["test.h5"],
                teacher=str(out / "teacher") if i == 0 and who == "student" else None, finetune_stores=finetune,
                finetune_epochs=args.finetune_epochs, repeats=100, overwrite=True, **opts))
            results[f"{who}, {name}"] = res
            if i == 0:
                rows += [{**r, "model": who if r["model"] == "student" else r["model"]}  # measured once
                         for r in res["rows"][:-1]]
            rows.append({**res["rows"][-1], "model": f"{who}, {name}"})
        tables.append(format_markdown({"rows": rows}))
    table = "\n\n".join(tables)

    # fine-tuning: distil from the unlabeled pool only, then fine-tune on the labeled digits
    _train(out / "pool-only", stores=(stores["pool.h5"],), temperature=1.0, alpha=0.0)
    _train(out / "pool-then-labeled", data=("digits:train",), init=str(out / "pool-only"), epochs=20, lr=1e-3)
    _train(out / "labeled-only", data=("digits:train",), epochs=20, lr=1e-3)
    ft = {name: evaluate(out / name, TEST, stores["test.h5"])
          for name in ("pool-only", "pool-then-labeled", "labeled-only")}
    ft_table = ["| student `mlp` | accuracy | agreement | KL to teacher | CORR |", "|---|---:|---:|---:|---:|"]
    for name, label in (("pool-only", "distilled from the unlabeled pool (989 rows, alpha 0, 40 epochs)"),
                        ("pool-then-labeled", "... then `--init` fine-tuned on the 449 labeled rows (20 epochs)"),
                        ("labeled-only", "the 449 labeled rows only, from scratch (20 epochs)")):
        r = ft[name]
        ft_table.append(f"| {label} | {100 * r['accuracy']:.2f} % | {100 * r['agreement']:.2f} % "
                        f"| {r['kl_to_teacher']:.4f} | {r['correlation']:.4f} |")
    seconds = time.perf_counter() - t0
    text = f"{table}\n\n" + "\n".join(ft_table) + f"\n\n({seconds:.0f} s, torch {torch.__version__})\n"
    (out / "compress_experiment.md").write_text(text)
    (out / "compress_experiment.json").write_text(json.dumps({"compress": results, "finetune": ft, "seconds": seconds},
                                                       indent=2, sort_keys=True, default=str) + "\n")
    print(text)


if __name__ == "__main__":
    main()
