"""The token teacher job: producer + writer overhead over the bare teacher, and bytes per token.

Two measurements, side by side in one run:

* **Overhead.** The same teacher (built-in ``gpt-medium``, 18x ``gpt-tiny`` at the demo's
  vocabulary of 4,096, and a larger GPT, ``--large``) over the same calls of the same token data: the bare loop is
  ``teacher(data.get_batch(call).ids)`` under ``inference_mode``; the job is
  ``UnitWriter.create`` + ``write`` of every piece of ``TokenProducer.batches`` + ``finish``
  (padding dropped, positions encoded, copied, checksummed, flagged), written in the
  calling thread; the producer alone (no store) is timed too, since the job runner's
  background writer overlaps the writing with the next teacher call. Runs alternate
  (bare, producer, job, bare, ...); medians of this process's CPU time are reported
  (``time.process_time``: every thread of the process, the storage libraries' included, and
  none of the other jobs of a shared machine). Target: job / bare <= 1.05.
* **Bytes per token** on disk (``size_on_disk / real positions``; units of whole chunks, so no unit
  padding: the default geometry adds about 3 %, :func:`default_chunk_samples`) for dense,
  top-k K in {8, 32} and sampled S = 12, HDF5 and Zarr, raw and compressed (Zarr: zstd
  level 3; HDF5: gzip + shuffle), at V = 4,096 and V = 128,256 (Llama 3's vocabulary).
  Target: <= 40 B/token for sampled.

The random teacher's logits are scaled so that its mean entropy per token is about
``--entropy`` nats (a random GPT is nearly uniform, which no trained LM is; the sampled
layout's size depends on how many of its S draws are distinct). Logits are float16 on disk
(bfloat16 for dense). One CPU thread.

    python tools/bench/bench_lm_generate.py                       # both measurements
    python tools/bench/bench_lm_generate.py --seqs 64 --repeats 1 # quicker
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softlabels.inputs.tokens import PackedTokens
from softlabels.store.backend import open_backend
from softlabels.store.layouts import make_layout
from softlabels.store.writer import UnitWriter
from softlabels.teacher.lm import BUILTIN_LMS, GPT, GPTConfig, build_lm
from softlabels.teacher.tokens import TokenProducer

LAYOUTS = [("dense", {}, "bfloat16"), ("topk", {"k": 8}, "float16"), ("topk", {"k": 32}, "float16"),
           ("sampled", {"samples": 12, "seed": 0}, "float16")]


class Scaled(nn.Module):
    """A teacher whose logits are multiplied by ``scale`` (sets its entropy)."""

    def __init__(self, module: nn.Module, scale: float) -> None:
        super().__init__()
        self.module, self.scale = module, scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.module(ids) * self.scale


def entropy(teacher: nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logp = torch.log_softmax(teacher(ids).float(), -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def calibrated(vocab: int, context: int, target: float, probe: torch.Tensor,
               shape: tuple[int, int, int] = BUILTIN_LMS["gpt-medium"]) -> tuple[Scaled, float]:
    """A GPT of ``shape`` (layers, heads, width) with its logits scaled to a mean entropy near ``target``
    nats (bisection on the scale)."""
    model = GPT(GPTConfig(vocab, context, *shape), seed=0).eval()
    lo, hi = 1.0, 1000.0
    for _ in range(20):
        mid = (lo * hi) ** 0.5
        if entropy(Scaled(model, mid), probe) > target:
            lo = mid
        else:
            hi = mid
    teacher = Scaled(model, (lo * hi) ** 0.5)
    return teacher, entropy(teacher, probe)


def data(seqs: int, seq_len: int, vocab: int) -> PackedTokens:
    rng = np.random.default_rng(0)
    return PackedTokens(rng.integers(0, vocab, (seqs, seq_len)), source="bench")


def bare(p: TokenProducer) -> float:
    t0 = time.process_time()
    with torch.inference_mode():
        for start, stop in p.calls(0, len(p.lengths())):
            p.teacher(p.data.get_batch(np.arange(start, stop)).ids)
    return time.process_time() - t0


def produce(p: TokenProducer) -> float:
    """The producer alone: calls, padding dropped, encoding, copy to host (no store)."""
    t0 = time.process_time()
    for _ in p.batches([(0, len(p.lengths()))]):
        pass
    return time.process_time() - t0


def job(p: TokenProducer, path: Path, **create) -> tuple[float, float]:
    """(seconds of the whole job, of which creating the store): creation is a fixed cost per store."""
    t0 = time.process_time()
    w = UnitWriter.create(path, p.meta(), lengths=p.lengths(), overwrite=True, **create)
    made = time.process_time() - t0
    for start, arrays in p.batches([(0, len(p.lengths()))]):
        w.write(start, **arrays)
    w.finish()
    w.close()
    return time.process_time() - t0, made


def size(path: Path) -> int:
    b = open_backend(path, "r")
    try:
        return b.size_on_disk()
    finally:
        b.close()


def overhead(args: argparse.Namespace, tmp: Path) -> None:
    ds = data(args.seqs, args.seq_len, args.vocab)
    student = sum(p.numel() for p in build_lm("gpt-tiny", args.vocab, args.seq_len).parameters())
    tokens = args.seqs * args.seq_len
    print(f"\n## Overhead: V = {args.vocab:,}, {args.seqs} x {args.seq_len} tokens, batches of {args.batch}, "
          f"median of {args.repeats}\n")
    print("| teacher (x gpt-tiny) | layout | store | bare CPU s | producer CPU s | job CPU s (creation) | "
          "producer / bare | job / bare | job − creation / bare | tokens per CPU s (job) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    sampled = ("sampled", {"samples": 12, "seed": 0})
    topk = ("topk", {"k": 32})
    cases = [("gpt-medium", sampled, "zarr", True), ("gpt-medium", sampled, "h5", False),
             ("gpt-medium", topk, "zarr", True), (args.large, sampled, "zarr", True)]
    for teacher_name, (name, params), backend, compress in cases:
        shape = BUILTIN_LMS.get(teacher_name) or tuple(int(v) for v in teacher_name.split("x"))
        teacher, h = calibrated(args.vocab, args.seq_len, args.entropy, ds.get_batch(np.arange(4)).ids, shape)
        ratio = sum(p.numel() for p in teacher.parameters()) / student
        layout = make_layout(name, num_classes=args.vocab, logits_dtype="float16", **params)
        p = TokenProducer(ds, teacher, layout, batch_size=args.batch)
        bare(p)  # warm-up
        b, q, j, c = [], [], [], []
        for _ in range(args.repeats):
            b.append(bare(p))
            q.append(produce(p))
            whole, made = job(p, tmp / f"o.{backend}", compress=compress)
            j.append(whole)
            c.append(made)
        mb, mq, mj, mc = (statistics.median(v) for v in (b, q, j, c))
        label = f"{name} {params.get('k') or params.get('samples')}"
        store = f"{'HDF5' if backend == 'h5' else 'Zarr'}{' compressed' if compress else ''}"
        print(f"| {teacher_name} ({ratio:.0f}x; H = {h:.2f}) | {label} | {store} | {mb:.2f} | {mq:.2f} | "
              f"{mj:.2f} ({mc:.2f}) | {mq / mb:.3f} | {mj / mb:.3f} | {(mj - mc) / mb:.3f} | {tokens / mj:,.0f} |", flush=True)


STORES = (("h5", False), ("h5", True), ("zarr", False), ("zarr", True))  # (backend, compressed)


def layout_bytes(teacher: nn.Module, layout, seqs: int, seq_len: int, batch: int, tmp: Path,
                 stores=STORES) -> tuple[list[float], float | None]:
    """Bytes on disk per real token of ``seqs`` sequences written in ``layout`` to each of ``stores``,
    and the mean number of distinct ids per token (sampled layouts with logits; else None)."""
    sub = data(seqs, seq_len, layout.num_classes)
    # units of exactly one chunk of whole sequences: no unit padding, so the figure is per real token
    per_chunk = min(seqs, max(1, 2048 // seq_len))
    p = TokenProducer(sub, teacher, layout, batch_size=batch, chunk_samples=per_chunk,
                      chunk_positions=per_chunk * seq_len)
    pieces = list(p.batches([(0, seqs)]))
    uniq = None
    if "sampled_counts" in pieces[0][1]:
        uniq = float((np.concatenate([a["sampled_counts"] for _, a in pieces]) > 0).sum(-1).mean())
    out = []
    for backend, compress in stores:
        path = tmp / f"b.{backend}"
        w = UnitWriter.create(path, p.meta(), lengths=p.lengths(), overwrite=True,
                              compress=compress and layout.name != "dense")
        for start, arrays in pieces:
            w.write(start, **arrays)
        w.finish()
        w.close()
        out.append(size(path) / (seqs * seq_len))
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out, uniq


def bytes_per_token(args: argparse.Namespace, tmp: Path) -> None:
    print(f"\n## Bytes per token (on disk / real tokens; mean teacher entropy ~{args.entropy} nats)\n", flush=True)
    print("| V | layout | logits | B/token layout | hdf5 | hdf5 gzip | zarr | zarr zstd | unique ids / token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for vocab in (args.vocab, 128_256):
        seqs = args.bytes_seqs if vocab <= 65_536 else max(2, args.bytes_seqs // 4)
        teacher, _ = calibrated(vocab, args.seq_len, args.entropy, data(seqs, args.seq_len, vocab).get_batch(np.arange(2)).ids)
        for name, params, dtype in LAYOUTS:
            layout = make_layout(name, num_classes=vocab, logits_dtype=dtype, **params)
            n = seqs if name != "dense" else max(1, seqs // 16)
            row, uniq = layout_bytes(teacher, layout, n, args.seq_len, args.batch, tmp)
            label = f"{name} {params.get('k') or params.get('samples') or ''}".strip()
            print(f"| {vocab:,} | {label} | {dtype} | {layout.bytes_per_position:,} | "
                  f"{' | '.join(f'{v:,.1f}' for v in row)} | {'' if uniq is None else f'{uniq:.1f}'} |")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--bytes-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--entropy", type=float, default=2.5)
    ap.add_argument("--large", default="4x6x384", help="A larger teacher, LAYERSxHEADSxWIDTH.")
    ap.add_argument("--only", choices=("overhead", "bytes"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_lm_"))
    try:
        if args.only != "bytes":
            overhead(args, tmp)
        if args.only != "overhead":
            bytes_per_token(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
