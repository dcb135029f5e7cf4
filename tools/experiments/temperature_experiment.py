"""Sparse teacher targets at T = 1, 2, 4: exact top-k tails, the old tail math, sampled at the draw T, ids only.

Two tasks, each with a teacher trained here on hard labels and small students distilled from it:

  tokens      next-token prediction on the standard library's own docstrings (English prose and
              code, not the LM demo's pydoc topics): a byte-level BPE of --vocab tokens, a built-in
              gpt-small teacher, gpt-tiny students; modules' docstrings split 9:1 into training and
              held-out text (whole modules, so held-out text is never seen)
  digits      scikit-learn's digits (10 classes): an mlp-large teacher on the train split, linear
              students on train + pool, held-out = the test split

For each T in --temperatures and each method, students are trained with the library's own loss
functions (``make_soft_loss``, at T, alpha = --alpha) on targets encoded by the library's layouts
from the teacher's logits (the arrays a store holds, kept in memory):

  dense          every logit (the reference)
  topk-exact     top-K ids and values plus the tail's logsumexp at T (``tail_temperatures``)
  topk-legacy    the same K ids and values with the tail softened as before: one class of logit
                 ``lse + log(tail mass)`` at T = 1, divided by T (what stores without a grid gave)
  sampled        S draws from softmax(z / T) with their logits (draw temperature T)
  sampled-ids    the same draws, ids only

and one ``hard`` student per seed (next-token / label CE alone). Reported per task, T and method,
mean ± std over --seeds: held-out CE loss and accuracy, KL(teacher || student) at T = 1, ECE
(15 bins, top-1), and bytes per position of the layout. A second table sweeps alpha for the
sparse layouts at T = 1 (what store/defaults.py's SPARSE_ALPHA rests on).

    python tools/experiments/temperature_experiment.py --out DIR [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for softlabels

from softlabels.store.layouts import DenseTarget, TopKTarget, make_layout, to_numpy  # noqa: E402
from softlabels.student.losses import make_soft_loss  # noqa: E402

METHODS = ("dense", "topk-exact", "topk-legacy", "sampled", "sampled-ids")
MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections contextlib copy csv dataclasses datetime "
    "decimal difflib dis email enum fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac "
    "html http.client http.server imaplib inspect io ipaddress itertools json locale logging mailbox mimetypes "
    "numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib pprint queue random re sched "
    "secrets selectors shelve shlex shutil smtplib socket socketserver sqlite3 ssl statistics string struct "
    "subprocess sysconfig tarfile tempfile textwrap threading timeit tokenize trace traceback types typing "
    "unittest urllib.parse urllib.request uuid warnings weakref xml.dom.minidom zipfile zoneinfo"
).split()


# -- data ------------------------------------------------------------------------------------------------
def docstrings(name: str) -> str:
    """A module's docstring and those of its public classes, functions and methods, in source order."""
    import importlib

    try:
        mod = importlib.import_module(name)
    except ImportError:
        return ""
    parts = [inspect.getdoc(mod) or ""]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                parts += [inspect.getdoc(m) or "" for a, m in sorted(vars(obj).items())
                          if not a.startswith("_") and inspect.isfunction(m)]
    return "\n\n".join(p for p in parts if p)


def token_windows(vocab: int, seq_len: int, quick: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(train windows [N, L + 1], held-out windows, vocabulary) of the docstrings, every 10th module held out."""
    from softlabels.inputs.text import encode_text, train_bpe

    texts = [docstrings(m) for m in (MODULES[:30] if quick else MODULES)]
    texts = [t for t in texts if t]
    train_texts = [t for i, t in enumerate(texts) if i % 10 != 9]
    held_texts = [t for i, t in enumerate(texts) if i % 10 == 9]
    tok = train_bpe(train_texts, vocab)

    def windows(ts: list[str]) -> np.ndarray:
        stream = np.concatenate([encode_text(t, tok) for t in ts])
        n = (len(stream) - 1) // seq_len
        idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
        return stream[idx].astype(np.int64)

    return windows(train_texts), windows(held_texts), tok.get_vocab_size()


# -- targets -------------------------------------------------------------------------------------------------
def encode(layout, z: torch.Tensor) -> Any:
    """The layout's decoded target of teacher logits ``z`` [N, C] (the arrays a store holds)."""
    ids = torch.arange(len(z))
    block = layout.encode(z, sample_ids=ids, positions=torch.zeros_like(ids))
    return layout.decode({k: to_numpy(v) for k, v in block.items()})


def targets(method: str, z: torch.Tensor, t: float, k: int, samples: int, seed: int) -> tuple[Any, int]:
    """(the typed target of ``method`` at T = t, its bytes per position) for fp16 teacher logits ``z``."""
    c = z.shape[1]
    if method == "dense":
        layout = make_layout("dense", num_classes=c, logits_dtype="float16")
        return DenseTarget(z.half()), layout.bytes_per_position
    if method == "topk-exact":
        layout = make_layout("topk", num_classes=c, logits_dtype="float16", k=k, tail_temperatures=[1, 2, 4])
        return encode(layout, z), layout.bytes_per_position
    if method == "topk-legacy":  # the T = 1 tail bucket softened as one class: (sum_tail e^z)^(1/T)
        layout = make_layout("topk", num_classes=c, logits_dtype="float16", k=k)
        legacy = encode(layout, z)
        return TopKTarget(legacy.values, legacy.ids, legacy.tails / t, (t,)), layout.bytes_per_position
    layout = make_layout("sampled", num_classes=c, logits_dtype="float16", samples=samples, seed=seed,
                         temperature=t, logits=method == "sampled")
    return encode(layout, z), layout.bytes_per_position


# -- training and metrics -------------------------------------------------------------------------------------
def fit(model: torch.nn.Module, n: int, step: Callable[[np.ndarray], torch.Tensor], *, epochs: int, batch: int,
        lr: float, seed: int) -> torch.nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, batch):
            loss = step(order[lo:lo + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def metrics(s: torch.Tensor, labels: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
    """Held-out CE, accuracy, KL(teacher || student) at T = 1 and ECE (15 equal-width bins) of logits ``s``."""
    s, z = s.double(), z.double()
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(z, -1)
    conf, pred = lq.exp().max(-1)
    right = (pred == labels).double()
    bins = torch.clamp((conf * 15).long(), max=14)
    ece = sum((right[bins == b].mean() - conf[bins == b].mean()).abs().item() * (bins == b).double().mean().item()
              for b in range(15) if (bins == b).any())
    return {"loss": F.nll_loss(lq, labels).item(), "accuracy": right.mean().item(),
            "kl": (lp.exp() * (lp - lq)).sum(-1).mean().item(), "ece": ece}


# -- the two tasks ---------------------------------------------------------------------------------------------
def token_task(args) -> dict[str, Any]:
    from softlabels.teacher.lm import build_lm

    seq = args.seq_len
    train, held, vocab = token_windows(args.vocab, seq, args.quick)
    x_tr, y_tr = torch.from_numpy(train[:, :-1]), torch.from_numpy(train[:, 1:]).reshape(-1)
    x_he, y_he = torch.from_numpy(held[:, :-1]), torch.from_numpy(held[:, 1:]).reshape(-1)
    teacher = build_lm("gpt-small", vocab, seq, seed=0)
    flat = lambda m, x: m(x).reshape(-1, vocab)  # noqa: E731
    fit(teacher, len(x_tr), lambda i: F.cross_entropy(flat(teacher, x_tr[i]), y_tr.view(len(x_tr), -1)[i].reshape(-1)),
        epochs=args.teacher_epochs, batch=16, lr=3e-3, seed=0)
    with torch.no_grad():
        z_tr = teacher(x_tr).reshape(-1, vocab).half().float()  # the store's float16 logits
        z_he = teacher(x_he).reshape(-1, vocab).float()
    student = lambda seed: build_lm("gpt-tiny", vocab, seq, seed=seed)  # noqa: E731
    rows_of = lambda i: (torch.as_tensor(i)[:, None] * seq + torch.arange(seq)).reshape(-1)  # noqa: E731
    info = {"task": "tokens", "vocab": vocab, "train_tokens": int(y_tr.numel()), "heldout_tokens": int(y_he.numel()),
            "teacher": metrics(z_he, y_he, z_he)}
    return run_task(args, info, student, lambda m, i: m(x_tr[i]).reshape(-1, vocab), y_tr, z_tr,
                    lambda m: m(x_he).reshape(-1, vocab), y_he, z_he, rows_of, len(x_tr), k=args.k,
                    epochs=args.epochs, lr=3e-3, batch=16)


def digits_task(args) -> dict[str, Any]:
    from softlabels.inputs.digits import load_digits_split
    from softlabels.teacher.models import build_model

    def xy(split):
        x, y = load_digits_split(split).get_batch(np.arange(len(load_digits_split(split))))
        return x.float(), y.long()

    (x_t, y_t), (x_p, y_p), (x_he, y_he) = xy("train"), xy("pool"), xy("test")
    torch.manual_seed(0)
    teacher = build_model("mlp-large", (64,), 10)
    fit(teacher, len(x_t), lambda i: F.cross_entropy(teacher(x_t[i]), y_t[i]), epochs=60, batch=32, lr=1e-3, seed=0)
    x_tr, y_tr = torch.cat([x_t, x_p]), torch.cat([y_t, y_p])
    with torch.no_grad():
        z_tr, z_he = teacher(x_tr).half().float(), teacher(x_he).float()

    def student(seed):
        torch.manual_seed(seed)
        return build_model("linear", (64,), 10)

    info = {"task": "digits", "train_rows": len(x_tr), "heldout_rows": len(x_he), "teacher": metrics(z_he, y_he, z_he)}
    return run_task(args, info, student, lambda m, i: m(x_tr[i]), y_tr, z_tr, lambda m: m(x_he), y_he, z_he,
                    lambda i: torch.as_tensor(i), len(x_tr), k=3, epochs=args.digits_epochs, lr=1e-2, batch=64)


def run_task(args, info, student, forward, y_tr, z_tr, forward_held, y_he, z_he, rows_of, n, *, k, epochs, lr, batch):
    """Every (T, method, seed) and the hard baseline; then the alpha sweep at T = 1. Each finished row is
    also written to OUT/partial-<task>.json, so an interrupted run keeps what it measured."""
    runs: dict[str, Any] = {}
    partial = Path(args.out) / f"partial-{info['task']}.json"

    def one(method: str, t: float, alpha: float, seed: int) -> dict[str, float]:
        target, nbytes = (None, 0) if method == "hard" else targets(method, z_tr, t, k, args.samples, seed)
        loss_name = {"dense": "kl", "topk-exact": "topk_kl", "topk-legacy": "topk_kl"}.get(method, "sampled_kl")
        soft = None if method == "hard" else make_soft_loss(loss_name, t)
        model = student(seed)

        def step(idx):
            s, rows = forward(model, idx), rows_of(idx)
            ce = F.cross_entropy(s, y_tr[rows])
            if soft is None or alpha == 1:
                return ce
            return alpha * ce + (1 - alpha) * soft(s, target.select(rows)).mean()

        fit(model, n, step, epochs=epochs, batch=batch, lr=lr, seed=seed)
        with torch.no_grad():
            out = metrics(forward_held(model), y_he, z_he)
        return {**out, "bytes": nbytes}

    def record(key: str, rows: list[dict[str, float]]) -> None:
        runs[key] = {m: [statistics.fmean(r[m] for r in rows), statistics.stdev(r[m] for r in rows)
                         if len(rows) > 1 else 0.0] for m in rows[0]}
        partial.write_text(json.dumps({**info, "runs": runs}, indent=2) + "\n")

    seeds = range(args.seeds)
    record("hard", [one("hard", 1.0, 1.0, s) for s in seeds])
    for t in args.temperatures:
        for method in METHODS:
            record(f"{method}@T={t:g}", [one(method, t, args.alpha, s) for s in seeds])
            print(f"  {method} T={t:g}: loss {runs[f'{method}@T={t:g}']['loss'][0]:.4f}", flush=True)
    for method in ("dense", "topk-exact", "sampled"):  # sampled-ids has sampled's gradient: the same students
        for alpha in args.alphas:
            if alpha != args.alpha or 1.0 not in args.temperatures:
                record(f"{method}@T=1,alpha={alpha:g}", [one(method, 1.0, alpha, s) for s in seeds])
    return {**info, "runs": runs}


def table(task: dict[str, Any]) -> str:
    lines = ["| method | T | B/position | held-out loss | accuracy | KL to teacher (T = 1) | ECE |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in task["runs"].items():
        method, _, t = key.partition("@T=")
        cells = [f"{r[m][0]:.4f} ± {r[m][1]:.4f}" for m in ("loss", "accuracy", "kl", "ece")]
        lines.append(f"| {method} | {t or '-'} | {int(r['bytes'][0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--alpha", type=float, default=0.0, help="hard-CE weight of the KD students in the main table")
    p.add_argument("--alphas", type=float, nargs="*", default=[0.5],
                   help="the alpha sweep at T = 1 (besides --alpha); none: no sweep")
    p.add_argument("--k", type=int, default=8, help="K of the token task's top-k (digits: 3)")
    p.add_argument("--samples", type=int, default=12, help="S, draws per position")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="token students' epochs")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--tasks", nargs="+", default=["tokens", "digits"], choices=["tokens", "digits"])
    p.add_argument("--quick", action="store_true", help="a fraction of the modules, for a smoke run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"args": vars(args)}
    for name in args.tasks:
        print(f"{name}:", flush=True)
        results[name] = (token_task if name == "tokens" else digits_task)(args)
        results[name]["table"] = table(results[name])
        print(results[name]["table"], flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['seconds']} s", flush=True)
    return results


if __name__ == "__main__":
    main()
