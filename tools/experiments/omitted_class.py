#!/usr/bin/env python
"""Hinton et al. (2015), section 3, on the digits: can a student recognise a digit it never saw?

A teacher is trained on every class. Its logits are stored for a *transfer set* from
which every example of one digit (3 by default) was removed. Students trained from that
store have never seen a 3, yet the teacher's soft labels on the other digits say how much
each of them looks like a 3. Hinton's MNIST student made 206 test errors, 133 of them on
the 1,010 threes; raising the bias of class 3 by 3.5 brought that to 109 errors, 14 on
threes. Here the bias shift is chosen on a validation split (which has threes), never on
the test split.

Every step runs the real command line; the bias-corrected evaluation loads the student's
weights (``weights_only``) into the built-in architecture.

    python tools/experiments/omitted_class.py [--digit 3] [--seeds 3] [--out runs/omitted]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, for demo.py
from demo import Runner  # noqa: E402  (the demo's subprocess runner: logs and timings)

SHIFTS = np.round(np.arange(0.0, 12.01, 0.25), 2)


def split_digits(out: Path, digit: int) -> dict[str, Path]:
    """Write transfer (without ``digit``), full transfer, validation and test .npz files."""
    from softlabels.inputs.digits import load_digits_split

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        ds = load_digits_split(split)
        return np.asarray(ds.get_batch(np.arange(len(ds)))[0]), np.asarray(ds.get_batch(np.arange(len(ds)))[1])

    xt, yt = arrays("train")
    xp, yp = arrays("pool")
    x, y = np.concatenate([xt, xp]), np.concatenate([yt, yp])
    rng = np.random.default_rng(0)
    val = np.zeros(len(y), bool)
    val[rng.permutation(len(y))[: len(y) // 6]] = True
    xs, ys = arrays("test")
    paths = {"full": out / "transfer_full.npz", "omitted": out / "transfer_omitted.npz", "val": out / "val.npz",
             "test": out / "test.npz"}
    np.savez(paths["full"], x=x[~val], y=y[~val])
    keep = ~val & (y != digit)
    np.savez(paths["omitted"], x=x[keep], y=y[keep])
    np.savez(paths["val"], x=x[val], y=y[val])
    np.savez(paths["test"], x=xs, y=ys)
    return paths


def logits_of(run: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from softlabels.teacher.models import build_model

    z = np.load(data)
    model = build_model(json.loads((run / "summary.json").read_text())["student"], (64,), 10)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(z["x"])).numpy(), z["y"]


def errors(logits: np.ndarray, y: np.ndarray, digit: int, shift: float) -> tuple[int, int]:
    z = logits.copy()
    z[:, digit] += shift
    wrong = z.argmax(1) != y
    return int(wrong.sum()), int(wrong[y == digit].sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digit", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path("runs/omitted"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    paths = split_digits(a.out, a.digit)
    sl = Runner(a.out, verbose=True)
    common = ["--device", "cpu", "--overwrite", "--no-progress", "--batch-size", "32"]
    sl("teacher (all digits)", "teacher", "train", "--student", "mlp-large", "--data", str(paths["full"]),
       "--epochs", "40", "--lr", "3e-3", "--out", "teacher", *common)
    sl("teacher logits, transfer set without the digit", "generate", "generate", "--teacher", "mlp-large",
       "--weights", "teacher/model.pt", "--data", str(paths["omitted"]), "--out", "omitted.zarr",
       "--device", "cpu", "--overwrite", "--no-progress")
    teacher_test = logits_of(a.out / "teacher", paths["test"])
    rows = []
    for seed in range(a.seeds):
        for kind in ("hard", "kd"):
            name = f"{kind}-{seed}"
            args = ["train", "--student", "mlp", "--epochs", str(a.epochs), "--lr", "1e-2", "--seed", str(seed),
                    "--out", name, *common]
            if kind == "hard":
                args += ["--data", str(paths["omitted"])]
            else:
                args += ["--store", "omitted.zarr", "--data", str(paths["omitted"]),
                         "--temperature", str(a.temperature), "--alpha", "0"]
            sl(f"student {name}", name, *args)
            val, test = logits_of(a.out / name, paths["val"]), logits_of(a.out / name, paths["test"])
            best = min(SHIFTS, key=lambda b: (errors(*val, a.digit, b)[0], b))  # on validation only
            rows.append({"student": kind, "seed": seed, "shift": float(best),
                         "test": errors(*test, a.digit, 0.0), "test_shifted": errors(*test, a.digit, best)})
    n_test, n_digit = len(teacher_test[1]), int((teacher_test[1] == a.digit).sum())
    result = {"digit": a.digit, "n_test": n_test, "n_digit_test": n_digit,
              "teacher": errors(*teacher_test, a.digit, 0.0), "rows": rows}
    (a.out / "omitted.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ntest: {n_test} digits, {n_digit} of them {a.digit}s; teacher errors "
          f"{result['teacher'][0]} ({result['teacher'][1]} on {a.digit}s)")
    print(f"{'student':<8} {'errors (on ' + str(a.digit) + 's)':>18} {'bias shift':>10} "
          f"{'after shift (on ' + str(a.digit) + 's)':>24}")
    for kind in ("hard", "kd"):
        r = [x for x in rows if x["student"] == kind]

        def ms(v: list[float]) -> str:
            return f"{np.mean(v):.1f} ± {np.std(v):.1f}"
        print(f"{kind:<8} {ms([x['test'][0] for x in r]) + ' (' + ms([x['test'][1] for x in r]) + ')':>18} "
              f"{ms([x['shift'] for x in r]):>10} "
              f"{ms([x['test_shifted'][0] for x in r]) + ' (' + ms([x['test_shifted'][1] for x in r]) + ')':>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
