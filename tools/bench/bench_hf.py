"""Hugging Face models at a real vocabulary: generate vs transformers' own loop, KD vs hard-label steps, peak RSS.

A small random Llama (2 layers, width 64; ``--width``) with V = 128,256 (Llama 3's vocabulary; ``--vocab``)
over random token windows, so the vocabulary-wide tensors dominate as they do in a real model's
head. Side by side in one process, rounds interleaved, medians of this process's CPU time
(``time.process_time``: every thread, none of the other jobs of a shared machine), one thread:

1. **generate** (``softlabels.generate``, sampled S = 12 and dense bfloat16, Zarr) against the bare
   loop ``model(input_ids, attention_mask).logits`` of ``AutoModelForCausalLM`` over the same windows
   in the same calls (``call_tokens(V)`` padded tokens each, the job's own); both load the model from
   the directory. Target: <= 1.10x.
2. **a KD training step** from the sampled store (``sampled_kl``, alpha 0.5, the store streamed;
   ``lm_loss`` as the trainer calls it) against a hard-label step (next-token CE on
   the same batches without a store), same student, same optimizer. Target: <= 1.15x.

Peak RSS (``ru_maxrss``) of each, alone in a fresh process, is printed after the ratios.

    python tools/bench/bench_hf.py                       # V = 128,256, 16 windows of 128 tokens, 3 rounds
    python tools/bench/bench_hf.py --vocab 151936        # Qwen2's vocabulary
    python tools/bench/bench_hf.py --width 512 --only generate   # a wider head: more work per logit
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch


def _setup(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The model directory, the token windows (.npy [N, L]) and the sampled store (written once)."""
    import transformers

    model_dir, tokens, store = tmp / "llama", tmp / "tok.npy", tmp / "sampled.zarr"
    if not model_dir.exists():
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(
            "llama", vocab_size=args.vocab, hidden_size=args.width, intermediate_size=2 * args.width,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=args.seq_len)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir, safe_serialization=True)
        rng = np.random.default_rng(0)
        np.save(tokens, rng.integers(0, args.vocab, (args.windows, args.seq_len)).astype(np.int64))
        _generate(model_dir, tokens, store, "sampled")
    return model_dir, tokens, store


def _generate(model_dir: Path, tokens: Path, out: Path, layout: str) -> None:
    from softlabels.teacher.job import generate

    params = {"samples": 12, "dtype": "float16"} if layout == "sampled" else {"dtype": "bfloat16"}
    generate(f"hf:{model_dir}", str(tokens), out, layout=layout, threads=1, overwrite=True, progress=False,
             **params)


def _bare(model_dir: Path, tokens: Path, vocab: int) -> None:
    """transformers' own forward over the job's calls (call_tokens(V) padded tokens each)."""
    import transformers

    from softlabels.teacher.lm import call_tokens

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.from_numpy(np.load(tokens))
    per_call = max(1, call_tokens(vocab) // ids.shape[1])
    with torch.inference_mode():
        for lo in range(0, len(ids), per_call):
            batch = ids[lo:lo + per_call]
            model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.sum()


def _steps(model_dir: Path, tokens: Path, store: Path | None, batch: int) -> None:
    """One epoch of training steps of the hf: student: KD from ``store``, or hard next-token CE without one."""
    from softlabels.inputs.tokens import open_token_file
    from softlabels.student.dataset import DataBatches, SoftLabelDataset
    from softlabels.student.kinds.tokens import data_batch, lm_loss
    from softlabels.student.losses import make_soft_loss
    from softlabels.teacher.lm import resolve_lm

    data = open_token_file(tokens)
    model = resolve_lm(f"hf:{model_dir}").module.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if store is None:
        data.vocab_size = model.vocab_size
        ds = DataBatches(np.arange(len(data)), partial(data_batch, data), share="batches",
                         batch_size=batch, seed=0, rank=0, world=1)
        soft, alpha = None, 1.0
    else:
        ds, soft, alpha = SoftLabelDataset([(store, data)], batch_size=batch, seed=0), \
            make_soft_loss("sampled_kl", 1.0), 0.5
    ds.set_epoch(0)
    for b in ds:
        total, _, _ = lm_loss(model(b["ids"]), b, soft, alpha)
        opt.zero_grad(set_to_none=True)
        (total / max(int(b["loss_mask"].sum()), 1)).backward()
        opt.step()


def _run(what: str, tmp: Path, args: argparse.Namespace) -> float:
    """CPU seconds of one candidate."""
    model_dir, tokens, store = _setup(tmp, args)
    t0 = time.process_time()
    if what == "bare":
        _bare(model_dir, tokens, args.vocab)
    elif what in ("sampled", "dense"):
        _generate(model_dir, tokens, tmp / f"{what}-out.zarr", what)
    else:
        _steps(model_dir, tokens, store if what == "kd" else None, args.batch)
    return time.process_time() - t0


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: per address space, so not the parent's RSS at fork, as ru_maxrss is)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CANDIDATES = ("bare", "sampled", "dense", "hard", "kd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--width", type=int, default=64, help="the model's hidden size (2 layers)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="training sequences per step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("generate", "train"), help="run one half (the other's rows are skipped)")
    ap.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child:  # one candidate alone: its peak RSS
        _run(args.child, Path(args.tmp), args)
        print(json.dumps({"maxrss_mib": _peak_rss_mib()}))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _setup(tmp, args)
        halves = {"generate": ("bare", "sampled", "dense"), "train": ("hard", "kd")}
        chosen = halves[args.only] if args.only else CANDIDATES
        times: dict[str, list[float]] = {c: [] for c in chosen}
        for _ in range(args.rounds):
            for c in chosen:
                times[c].append(_run(c, tmp, args))
        med = {c: statistics.median(v) for c, v in times.items()}
        tokens = args.windows * args.seq_len
        print(f"V = {args.vocab:,}, width {args.width}, {args.windows} windows x {args.seq_len} tokens, "
              f"{args.rounds} rounds, median CPU seconds (all rounds in brackets)")
        for c in chosen:
            print(f"  {c:8s} {med[c]:7.2f} s  {tokens / med[c]:8,.0f} tokens/s  {[round(t, 2) for t in times[c]]}")
        if "bare" in med:
            for c, what in (("sampled", "sampled S=12"), ("dense", "dense bf16  ")):
                print(f"generate {what} / bare transformers loop: {med[c] / med['bare']:.2f}x (target <= 1.10)")
        if "kd" in med:
            print(f"KD step (sampled_kl)  / hard-label step:        {med['kd'] / med['hard']:.2f}x (target <= 1.15)")
        base = [sys.executable, __file__, "--tmp", str(tmp), "--vocab", str(args.vocab), "--width", str(args.width),
                "--windows", str(args.windows), "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
        rss = {c: json.loads(subprocess.run([*base, "--child", c], check=True, capture_output=True,
                                            text=True).stdout.strip().splitlines()[-1])["maxrss_mib"]
               for c in chosen}
        print("peak RSS, each alone in a fresh process: " + ", ".join(f"{c} {v:,.0f} MiB" for c, v in rss.items()))


if __name__ == "__main__":
    main()
