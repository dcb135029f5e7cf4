"""Bias of sparse KD targets against dense KL: sampled (unbiased at its draw T) vs top-k at the same bytes.

    python tools/experiments/sampled_bias.py [--classes 1000] [--rows 256] [--samples 12] [--seeds 200]

A classification-like setting: C classes with 16-dimensional class embeddings;
a sample's teacher logits are ``tau * <h, e_c>`` with ``h`` its class's embedding
plus noise, so the teacher is peaked (mean top-1 probability and entropy are
printed) and its tail follows class similarity, as a trained classifier's does.
The student is a cooler model of the same kind, with noise of its own. Teacher logits are
rounded to float16 (the store dtype) before anything else.

For one batch of ``--rows`` rows, the dense forward KL (mean over rows) and its
gradient at T are the reference. The sampled layout with S draws at Td = T is encoded with
``--seeds`` different seeds; the mean of its batch loss and gradient over seeds is
compared with the reference in units of the standard error (|z| < ~3 means no
bias detectable). Top-k (with its exact tail at T) is deterministic: its bias is compared with the same
standard error. K is chosen so that a top-k row takes no more bytes than a
sampled row (float16 logits, uint16 ids, uint8 counts, float32 logsumexp).

A second table gives each divergence's bucket approximation (support + tail,
see softlabels/kd.py) against the dense value at T = 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for softlabels

from softlabels.store.layouts import DenseTarget, SampledTarget, TopKTarget, make_layout, to_numpy  # noqa: E402
from softlabels.student import kd  # noqa: E402


def make_models(classes: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(classes, 16, generator=g, dtype=torch.float64) / 4
    y = torch.randint(0, classes, (rows,), generator=g)
    h = emb[y] + 0.1 * torch.randn(rows, 16, generator=g, dtype=torch.float64)
    teacher = (20.0 * h @ emb.T).half().double()  # stored as float16
    h_s = h + 0.1 * torch.randn(rows, 16, generator=g, dtype=torch.float64)  # a student part-way there
    student = 12.0 * h_s @ emb.T
    return teacher, student


def encode(layout, teacher: torch.Tensor):
    ids = torch.arange(len(teacher))
    block = layout.encode(teacher.float(), sample_ids=ids, positions=0 * ids)
    return layout.decode({k: to_numpy(v) for k, v in block.items()})


def loss_and_grad(fn, student: torch.Tensor) -> tuple[float, torch.Tensor]:
    s = student.clone().requires_grad_()
    loss = fn(s).mean()
    (grad,) = torch.autograd.grad(loss, s)
    return loss.item(), grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    c, s_draws = args.classes, args.samples
    teacher, student = make_models(c, args.rows)
    p = torch.softmax(teacher, -1)
    sampled_layout = make_layout("sampled", num_classes=c, logits_dtype="float16", samples=s_draws)
    k = max(1, (sampled_layout.bytes_per_position - 4) // 4)  # fp16 value + uint16 id per slot
    topk_layout = make_layout("topk", num_classes=c, logits_dtype="float16", k=k)
    topk = topk_layout.decode({n: to_numpy(v) for n, v in topk_layout.encode(teacher.float()).items()})
    out = {"classes": c, "rows": args.rows, "seeds": args.seeds,
           "teacher_top1_prob": p.max(-1).values.mean().item(),
           "teacher_entropy": (-(p * p.clamp_min(1e-300).log()).sum(-1)).mean().item(),
           "bytes_per_row": {"dense": make_layout("dense", num_classes=c, logits_dtype="float16").bytes_per_position,
                             f"sampled S={s_draws}": sampled_layout.bytes_per_position,
                             f"topk K={k}": topk_layout.bytes_per_position}}
    def drawn(temperature: float) -> list[SampledTarget]:
        """The sampled targets of every seed, drawn at Td = ``temperature`` (the only T a sampled store answers)."""
        out = [encode(make_layout("sampled", num_classes=c, logits_dtype="float16", samples=s_draws, seed=seed,
                                  temperature=temperature), teacher) for seed in range(args.seeds)]
        # the store's float16 logits of the drawn ids equal the teacher's (already float16): exact references
        return [SampledTarget(t.ids, t.counts, teacher.gather(1, t.ids), (teacher / temperature).logsumexp(-1),
                              temperature) for t in out]

    targets = drawn(1.0)
    out["mean_unique_ids"] = torch.stack([t.valid.sum(-1).double() for t in targets]).mean().item()
    # top-k with exact tails at T = 1 and 2, in float64 (what the layout stores, in float32)
    rest = teacher.scatter(1, topk.ids, -torch.inf)
    topk = TopKTarget(teacher.gather(1, topk.ids), topk.ids,
                      torch.stack([torch.logsumexp(rest / t, -1) for t in (1.0, 2.0)], -1), (1.0, 2.0))
    forward = []
    for temperature in (1.0, 2.0):
        per_seed = targets if temperature == 1 else drawn(temperature)
        dense_l, dense_g = loss_and_grad(lambda s: kd.divergence("forward_kl", s, DenseTarget(teacher), temperature),
                                         student)
        runs = [loss_and_grad(lambda s, t=t: kd.sampled_kl(s, t, temperature), student) for t in per_seed]
        losses = torch.tensor([r[0] for r in runs], dtype=torch.float64)
        grads = torch.stack([r[1] for r in runs])
        se = (losses.std() / len(losses) ** 0.5).item()
        g_err = (grads.mean(0) - dense_g).norm().item()
        g_floor = (grads.var(0).sum() / len(grads)).sqrt().item()  # E|mean - truth| for an unbiased estimator
        tk_l, tk_g = loss_and_grad(lambda s: kd.divergence("forward_kl", s, topk, temperature), student)
        forward.append({
            "T": temperature, "dense_kl": dense_l,
            "sampled_mean": losses.mean().item(), "sampled_se": se, "sampled_z": (losses.mean().item() - dense_l) / se,
            "sampled_grad_err_over_noise": g_err / g_floor,
            "sampled_grad_rel_err": g_err / dense_g.norm().item(),
            "topk_kl": tk_l, "topk_z": (tk_l - dense_l) / se,
            "topk_grad_err_over_noise": (tk_g - dense_g).norm().item() / g_floor,
            "topk_grad_rel_err": (tk_g - dense_g).norm().item() / dense_g.norm().item(),
        })
    out["forward_kl"] = forward
    buckets = []
    for kind in kd.DIVERGENCES:
        dense = kd.divergence(kind, student, DenseTarget(teacher), 1.0).mean().item()
        tk = kd.divergence(kind, student, topk, 1.0).mean().item()
        sm = torch.tensor([kd.divergence(kind, student, t, 1.0).mean().item() for t in targets[:20]]).mean().item()
        buckets.append({"divergence": kind, "dense": dense, "topk_bucket": tk, "sampled_bucket": sm,
                        "topk_rel_err": (tk - dense) / dense, "sampled_rel_err": (sm - dense) / dense})
    out["bucket_approximation_t1"] = buckets
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"C={c} rows={args.rows} seeds={args.seeds}: teacher mean top-1 prob {out['teacher_top1_prob']:.3f}, "
          f"entropy {out['teacher_entropy']:.3f} nats; sampled rows hold {out['mean_unique_ids']:.1f} unique ids")
    print("bytes per row: " + ", ".join(f"{k} {v}" for k, v in out["bytes_per_row"].items()))
    print("forward KL per batch; z = (mean - dense) / se of the sampled mean; grad err = |mean grad - dense grad| "
          "/ |dense grad|, and over its noise floor (~1 when unbiased)")
    print(f"{'T':>3s} {'dense KL':>9s} {'sampled mean':>13s} {'+- se':>8s} {'z':>6s} {'grad err':>9s} {'/noise':>7s} "
          f"{'top-k KL':>9s} {'z':>8s} {'grad err':>9s} {'/noise':>7s}")
    for r in forward:
        print(f"{r['T']:3.0f} {r['dense_kl']:9.4f} {r['sampled_mean']:13.4f} {r['sampled_se']:8.4f} "
              f"{r['sampled_z']:6.2f} {r['sampled_grad_rel_err']:9.4f} {r['sampled_grad_err_over_noise']:7.2f} "
              f"{r['topk_kl']:9.4f} {r['topk_z']:8.1f} {r['topk_grad_rel_err']:9.4f} {r['topk_grad_err_over_noise']:7.2f}")
    print("bucket approximation at T = 1 (stored ids + one tail bucket; mean over rows):")
    print(f"{'divergence':16s} {'dense':>8s} {'top-k':>8s} {'rel err':>8s} {'sampled':>8s} {'rel err':>8s}")
    for r in buckets:
        print(f"{r['divergence']:16s} {r['dense']:8.4f} {r['topk_bucket']:8.4f} {r['topk_rel_err']:8.3f} "
              f"{r['sampled_bucket']:8.4f} {r['sampled_rel_err']:8.3f}")


if __name__ == "__main__":
    main()
