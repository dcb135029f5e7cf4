"""Which stored teacher targets distil a language model best, per byte on disk?

A teacher GPT is trained on the training tokens; its per-token outputs are stored in
several layouts; a student is trained from each for the same number of steps, and
evaluated on held-out tokens against a dense store of the teacher's held-out outputs:

  hard           next-token CE only (alpha = 1: the dense store is read, its targets unused)
  dense          forward KL to the full distribution
  topk8, topk32  top-K forward KL over the K ids plus the exact tail bucket
  topk8-renorm, topk32-renorm   the same K ids, the teacher renormalised over them (no tail)
  sampled        the sampled layout's unbiased forward-KL estimator, S draws giving ~12 unique ids

Reported per method, mean ± std over seeds: bytes/token (the layout's per-position bytes,
and the Zarr store's bytes on disk, zstd-compressed, over its positions), held-out loss and
perplexity, KL to the teacher, top-1 agreement and ECE. Stores are written by ``generate``
(the token producer on the job runner) from the teacher's saved weights.

    python tools/lm_data.py --out demo/lm            # tokenizer + train/held-out token files
    python tools/experiments/lm_experiment.py --data demo/lm --out demo/lm-exp [--seeds 3] [--epochs 2]
    python tools/experiments/lm_experiment.py --quick --out DIR  # seconds: synthetic tokens, for the tests
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
from softlabels.inputs.text import resolve_token_data
from softlabels.store.schema import StoreMetaV2
from softlabels.student.config import TrainConfig
from softlabels.student.trainer import train
from softlabels.teacher.lm import build_lm

# method -> (layout, layout params, train options)
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "hard": ("dense", {}, {"alpha": 1.0}),
    "dense": ("dense", {}, {}),
    "topk8": ("topk", {"k": 8}, {}),
    "topk8-renorm": ("topk", {"k": 8}, {"topk_renormalize": True}),
    "topk32": ("topk", {"k": 32}, {}),
    "topk32-renorm": ("topk", {"k": 32}, {"topk_renormalize": True}),
    "sampled": ("sampled", {"samples": None, "seed": 0}, {}),
}
UNIQUE_TARGET = 12


def synthetic(out: Path, vocab: int = 64, n: int = 48, length: int = 24, seed: int = 0) -> tuple[str, str]:
    """Train / held-out token files from a random sparse Markov chain (a learnable, non-trivial text)."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, vocab, (vocab, 3))
    specs = []
    for name, count in (("train", n), ("heldout", n // 4)):
        seqs = np.empty((count, length), np.int64)
        seqs[:, 0] = rng.integers(0, vocab, count)
        for t in range(1, length):
            seqs[:, t] = nxt[seqs[:, t - 1], rng.integers(0, 3, count)]
        np.save(out / f"{name}.npy", seqs)
        specs.append(str(out / f"{name}.npy"))
    return specs[0], specs[1]


def train_teacher(data, vocab: int, *, name: str, epochs: int, batch: int, lr: float, seed: int = 0):
    """A built-in GPT trained on the hard next-token loss (a plain loop: the teacher is not the subject)."""
    from softlabels.student.lm_metrics import next_token_ce

    context = int(data.lengths().max())
    model = build_lm(name, vocab, context, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(data))
        for lo in range(0, len(order), batch):
            b = data.get_batch(order[lo:lo + batch])
            loss = next_token_ce(model(b.ids), b.ids, b.mask, b.lengths)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def make_store(path: Path, weights: Path, teacher_name: str, spec: str, tokenizer: str | None, vocab: int,
               layout: str, params: dict[str, Any], *, batch: int = 16) -> str:
    """The teacher's per-token outputs on ``spec`` in ``layout``, written by ``generate`` (the token producer)
    with ``compress`` (Zarr zstd) on the sparse layouts; dense stays raw."""
    from softlabels.teacher.job import generate

    options: dict[str, Any] = {"topk": params["k"]} if layout == "topk" else {}
    if layout == "sampled":
        options = {"samples": params["samples"], "seed": params["seed"]}
    settings = dict(weights=str(weights), tokenizer=tokenizer, num_classes=vocab, layout=layout, dtype="float16",
                    batch_size=batch, device="cpu", progress=False, compress=layout != "dense", **options)
    generate(teacher_name, spec, path, overwrite=True, **settings)
    return str(path)


def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a store: the file, or every file under a Zarr directory."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def samples_for_unique(teacher, data, target: int = UNIQUE_TARGET, choices=(12, 16, 24, 32, 48, 64, 96, 128)
                       ) -> tuple[int, float]:
    """The number of draws S (of ``choices``) whose mean count of unique ids per token is closest to ``target``."""
    from softlabels.store.layouts import make_layout

    b = data.get_batch(np.arange(min(len(data), 32)))
    with torch.no_grad():
        logits = teacher(b.ids)[b.valid]
    pos = torch.arange(len(logits))
    best = None
    for s in choices:
        lay = make_layout("sampled", num_classes=logits.shape[-1], samples=s, seed=0)
        unique = float((lay.encode(logits, sample_ids=pos * 0, positions=pos)["sampled_counts"] > 0).sum(-1)
                       .float().mean())
        if best is None or abs(unique - target) < abs(best[1] - target):
            best = (s, unique)
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.quick:
        train_spec, held_spec = synthetic(out)
        tokenizer, seq_len, vocab = None, None, 64
        teacher_name, teacher_epochs = "gpt-small", 6
    else:
        d = Path(args.data)
        train_spec, held_spec, tokenizer = str(d / "train.npz"), str(d / "heldout.npz"), str(d / "tokenizer.json")
        seq_len = None
        vocab = json.loads((d / "lm_data.json").read_text())["vocab_size"]
        teacher_name, teacher_epochs = args.teacher, args.teacher_epochs
    train_data = resolve_token_data(train_spec, tokenizer=tokenizer, seq_len=seq_len)
    held_data = resolve_token_data(held_spec, tokenizer=tokenizer, seq_len=seq_len)
    t0 = time.perf_counter()
    if args.teacher_weights:  # a teacher trained by an earlier run
        weights = Path(args.teacher_weights)
        teacher = build_lm(teacher_name, vocab, int(train_data.lengths().max()))
        teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        teacher.eval()
    else:
        teacher = train_teacher(train_data, vocab, name=teacher_name, epochs=teacher_epochs, batch=args.batch_size,
                                lr=args.teacher_lr)
        weights = out / "teacher.pt"
        torch.save(teacher.state_dict(), weights)
    samples, unique = samples_for_unique(teacher, train_data, choices=(args.samples,) if args.samples else
                                         (12, 16, 24, 32, 48, 64, 96, 128))
    log = print if not args.quiet else (lambda *_: None)
    log(f"teacher {teacher_name} ready in {time.perf_counter() - t0:.0f}s; sampled: S = {samples} "
        f"(~{unique:.1f} unique ids/token)")
    held_store = make_store(out / "heldout-dense.zarr", weights, teacher_name, held_spec, tokenizer, vocab, "dense", {})
    results: dict[str, Any] = {"methods": {}, "samples": samples, "unique_ids": unique, "vocab": vocab,
                               "teacher": teacher_name, "seeds": args.seeds, "epochs": args.epochs}
    stores: dict[tuple[str, str], str] = {}
    for method in args.methods:
        layout, params, options = METHODS[method]
        params = {**params, "samples": samples} if layout == "sampled" else params
        key = (layout, json.dumps(params, sort_keys=True))
        if key not in stores:
            stores[key] = make_store(out / f"train-{layout}-{len(stores)}.zarr", weights, teacher_name, train_spec,
                                     tokenizer, vocab, layout, params)
        store = stores[key]
        meta_bytes = StoreMetaV2(positions="sample", layout=layout, num_samples=1, num_classes=vocab,
                                 logits_dtype="float16", layout_params=params).layout_obj().bytes_per_position
        rows = []
        for seed in range(args.seeds):
            options = dict(options)
            renorm = options.pop("topk_renormalize", False)
            config = TrainConfig(student=args.student, stores=(store,), out=str(out / f"{method}-{seed}"),
                                 epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                 device="cpu", overwrite=True, progress=False,
                                 alpha=options.get("alpha", args.alpha), temperature=1.0, topk_renormalize=renorm)
            train(config)
            rows.append(evaluate(config.out, held_spec, held_store, batch_size=64, device="cpu"))
        positions = int(train_data.lengths().sum())
        entry = {"layout": layout, "params": params, "bytes_per_token": meta_bytes,
                 "file_bytes_per_token": disk_bytes(store) / positions if method != "hard" else None,
                 "runs": rows}
        for metric in ("loss", "perplexity", "kl_to_teacher", "agreement", "ece"):
            values = [r[metric] for r in rows]
            entry[metric] = [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
        results["methods"][method] = entry
        log(f"{method}: loss {entry['loss'][0]:.4f} ± {entry['loss'][1]:.4f}, KL {entry['kl_to_teacher'][0]:.4f}")
    results["table"] = table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(results["table"] + "\n")
    log(results["table"])
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| method | B/token (raw) | B/token on disk | held-out loss | perplexity | KL to teacher | agreement | ECE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, e in results["methods"].items():
        size = "0 | 0" if method == "hard" else f"{e['bytes_per_token']} | {e['file_bytes_per_token']:.1f}"
        cells = [f"{e[m][0]:.3f} ± {e[m][1]:.3f}" for m in ("loss", "perplexity", "kl_to_teacher", "agreement", "ece")]
        lines.append(f"| {method} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a tools/lm_data.py output directory (train.npz, heldout.npz, tokenizer.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="synthetic tokens, tiny models: seconds, for tests")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=0.0, help="hard-CE weight of the KD students")
    p.add_argument("--student", default="gpt-tiny")
    p.add_argument("--teacher", default="gpt-medium")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--teacher-weights", help="reuse this teacher (an earlier run's OUT/teacher.pt) instead of training one")
    p.add_argument("--samples", type=int, help="S for the sampled layout (default: the S giving ~12 unique ids/token)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.quick and not args.data:
        p.error("pass --data DIR (made by tools/lm_data.py), or --quick")
    return run(args)


if __name__ == "__main__":
    main()
