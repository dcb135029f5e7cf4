"""Language-model students from a token store, side by side in one run (issue 11's last two figures).

1. Streaming: ``SoftLabelDataset`` over the store (checksums on, decoded targets, joined with the token ids)
   against contiguous reads of the same arrays with the storage library alone (every array of
   the store read whole per unit, plus the token ids): tokens/s.
2. One KD epoch (``sampled_kl``, alpha 0.5, the store streamed) against one hard-CE epoch
   (``DataBatches`` of ``data_batch``: the same batches without a store), same student, same steps.

Rounds are interleaved; the figures are medians. A random ``gpt-medium`` teacher labels random
tokens (its logits are all the benchmark needs); the student is ``gpt-tiny``. One thread.

    python tools/bench/bench_lm_train.py [--sequences 512] [--seq-len 128] [--vocab 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch


def _store(tmp: Path, args: argparse.Namespace, ext: str) -> tuple[Path, Path]:
    tokens = tmp / "tok.npy"
    if not tokens.exists():
        rng = np.random.default_rng(0)
        np.save(tokens, rng.integers(0, args.vocab, (args.sequences, args.seq_len + 1)).astype(np.int64))
    out = tmp / f"s.{ext}"
    subprocess.run([sys.executable, "-m", "softlabels", "generate", "--teacher", "gpt-medium", "--random-teacher",
                    "--num-classes", str(args.vocab), "--data", str(tokens), "--out", str(out), "--layout",
                    "sampled", "--samples", "12", "--dtype", "float16", "--no-progress", "--overwrite"],
                   check=True, capture_output=True)
    return tokens, out


def _plain(store: Path, tokens: Path) -> int:
    """Every array of the store read whole by the storage library, and the token ids: bytes read."""
    total = np.load(tokens).nbytes
    if store.suffix == ".zarr":
        import zarr

        g = zarr.open_group(str(store), mode="r")
        arrays = [g[name] for name in g.array_keys()]
    else:
        import h5py

        f = h5py.File(store, "r")
        arrays = [f[name] for name in f]
    for a in arrays:
        total += np.asarray(a[...]).nbytes
    return total


def _stream(store: Path, tokens: Path, batch: int) -> int:
    from softlabels.inputs.tokens import open_token_file
    from softlabels.student.dataset import SoftLabelDataset

    ds = SoftLabelDataset([(store, open_token_file(tokens))], batch_size=batch, seed=0)
    ds.set_epoch(0)
    return sum(int(b["index"].numel()) for b in ds)


def _epoch(store: Path | None, tokens: Path, batch: int, vocab: int) -> float:
    """Seconds of one training epoch of gpt-tiny: KD from ``store``, or hard CE without one."""
    from softlabels.inputs.tokens import open_token_file
    from softlabels.student.dataset import DataBatches, SoftLabelDataset
    from softlabels.student.kinds.tokens import data_batch, lm_loss
    from softlabels.student.losses import make_soft_loss
    from softlabels.teacher.lm import resolve_lm

    data = open_token_file(tokens)
    model = resolve_lm("gpt-tiny", vocab_size=vocab, context=int(data.lengths().max()), seed=0).module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if store is None:
        data.vocab_size = vocab
        ds = DataBatches(np.arange(len(data)), partial(data_batch, data), share="batches",
                         batch_size=batch, seed=0, rank=0, world=1)
        soft, alpha = None, 1.0
    else:
        ds, soft, alpha = (SoftLabelDataset([(store, data)], batch_size=batch, seed=0),
                           make_soft_loss("sampled_kl", 1.0), 0.5)
    ds.set_epoch(0)
    t0 = time.perf_counter()
    for b in ds:
        total, _, _ = lm_loss(model(b["ids"]), b, soft, alpha)
        opt.zero_grad(set_to_none=True)
        (total / max(int(b["loss_mask"].sum()), 1)).backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for ext in ("h5", "zarr"):
            tokens, store = _store(tmp, args, ext)
            n_tok = args.sequences * (args.seq_len + 1)
            plain, stream, hard, kd = [], [], [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter(); _plain(store, tokens); plain.append(n_tok / (time.perf_counter() - t0))
                t0 = time.perf_counter(); n = _stream(store, tokens, args.batch)
                stream.append(n / (time.perf_counter() - t0))
                hard.append(_epoch(None, tokens, args.batch, args.vocab))
                kd.append(_epoch(store, tokens, args.batch, args.vocab))
            p, s = statistics.median(plain), statistics.median(stream)
            h, k = statistics.median(hard), statistics.median(kd)
            print(f"{ext:4s}  stream {s:,.0f} tokens/s vs contiguous reads {p:,.0f}: {s / p:.2f}x (target >= 0.5)   "
                  f"KD epoch {k:.2f} s vs hard-CE epoch {h:.2f} s: {k / h:.2f}x (target <= 1.15)")


if __name__ == "__main__":
    main()
