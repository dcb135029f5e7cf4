"""Sparse stores at any temperature they record: exact top-k tails, sampled draws at Td, refusals, old stores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from softlabels.errors import ConfigError
from softlabels.store.defaults import SPARSE_ALPHA, choose
from softlabels.store.layouts import DenseTarget, make_layout, to_numpy
from softlabels.store.reader import open_store
from softlabels.store.temperatures import parse_grid
from softlabels.student import kd
from softlabels.student.losses import make_soft_loss
from tests.conftest import assert_one_line_error, make_rows, run_cli, write_store

FIXTURES = Path(__file__).parent / "fixtures" / "v1"


def stored(arrays: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in arrays.items()}


def np_topk_kl(s: np.ndarray, z: np.ndarray, k: int, t: float) -> np.ndarray:
    """T^2 KL between teacher and student p_T lumped into the teacher's top-K ids plus the rest: float64 numpy."""
    def softmax(x):
        e = np.exp(x / t - (x / t).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    idx = np.argsort(-z, -1, kind="stable")[:, :k]
    p, q = softmax(z), softmax(s)
    pk, qk = np.take_along_axis(p, idx, 1), np.take_along_axis(q, idx, 1)
    pb = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], 1)
    qb = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], 1)
    return t * t * (pb * (np.log(pb) - np.log(qb))).sum(-1)


# -- top-k: exact at every grid T ------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 16])
def test_topk_loss_equals_the_exact_bucketed_kl_at_every_grid_t(k: int) -> None:
    """Teacher logits through the layout's encode and decode; the loss against an independent float64 formula."""
    c, rows = 40, 12
    gen = torch.Generator().manual_seed(k)
    z = 3 * torch.randn(rows, c, generator=gen)
    s = 2 * torch.randn(rows, c, generator=gen, dtype=torch.float64)
    layout = make_layout("topk", num_classes=c, k=k, tail_temperatures=[1, 2, 4])
    target = layout.decode(stored(layout.encode(z)))
    for t in (1.0, 2.0, 4.0):
        got = make_soft_loss("topk_kl", t)(s, target).numpy()
        np.testing.assert_allclose(got, np_topk_kl(s.numpy(), z.double().numpy(), k, t), rtol=1e-6, atol=1e-6)


def test_tail_logsumexp_is_exact_and_minus_inf_without_a_tail() -> None:
    z = 4 * torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    layout = make_layout("topk", num_classes=30, k=3, tail_temperatures=[0.5, 3])
    tails = stored(layout.encode(z))["tail_logsumexp"]
    zs = z.double().numpy()
    rest = np.sort(zs, -1)[:, :-3]
    for g, t in enumerate((0.5, 3.0)):
        np.testing.assert_allclose(tails[:, g], np.log(np.exp(rest / t).sum(-1)), rtol=1e-6)
    full = make_layout("topk", num_classes=30, k=30, tail_temperatures=[1])
    block = stored(full.encode(z))
    assert np.isneginf(block["tail_logsumexp"]).all() and full.validate(block) == []


def test_a_t_off_the_grid_is_refused_in_one_line() -> None:
    layout = make_layout("topk", num_classes=10, k=3, tail_temperatures=[1, 2, 4])
    target = layout.decode(stored(layout.encode(torch.randn(4, 10))))
    with pytest.raises(ConfigError, match=r"answers only those exactly, not T = 3; pass temperature=1, 2 or 4, "
                                          r"or regenerate it with .*--tail-temperatures 1,2,3,4"):
        make_soft_loss("topk_kl", 3.0)(torch.randn(4, 10), target)


# -- sampled: the estimator at its draw temperature ---------------------------------------------------
@pytest.mark.parametrize("td", [1.0, 2.0])
def test_sampled_estimate_is_unbiased_at_the_draw_t(td: float) -> None:
    c, samples, seeds = 25, 12, 400
    gen = torch.Generator().manual_seed(3)
    z, s = 3 * torch.randn(1, c, generator=gen), 2 * torch.randn(1, c, generator=gen, dtype=torch.float64)
    dense = (td * td * kd.divergence("forward_kl", s, DenseTarget(z.double()), td)).item()
    values = []
    for seed in range(seeds):
        layout = make_layout("sampled", num_classes=c, samples=samples, seed=seed, temperature=td)
        block = stored(layout.encode(z, sample_ids=torch.zeros(1, dtype=torch.long),
                                     positions=torch.zeros(1, dtype=torch.long)))
        values.append(make_soft_loss("sampled_kl", td)(s, layout.decode(block)).item())
    v = np.asarray(values)
    assert abs(v.mean() - dense) < 4 * v.std() / math.sqrt(seeds), (v.mean(), dense)
    # the draws follow p_Td: their frequencies match it
    layout = make_layout("sampled", num_classes=c, samples=4000, temperature=td)
    tgt = layout.decode(stored(layout.encode(z, sample_ids=torch.zeros(1, dtype=torch.long),
                                             positions=torch.zeros(1, dtype=torch.long))))
    freq = torch.zeros(c, dtype=torch.float64).scatter_add_(0, tgt.ids[0], tgt.counts[0].double()) / 4000
    p = torch.softmax(z[0].double() / td, -1)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / 4000).sqrt() + 1e-3).all()


def test_ids_only_store_has_the_same_gradient_and_says_what_it_cannot_answer() -> None:
    c, rows = 50, 6
    z = 2 * torch.randn(rows, c, generator=torch.Generator().manual_seed(4))
    ids, pos = torch.arange(rows), torch.zeros(rows, dtype=torch.long)
    full = make_layout("sampled", num_classes=c, samples=12, temperature=2.0)
    lean = make_layout("sampled", num_classes=c, samples=12, temperature=2.0, logits=False)
    assert lean.bytes_per_position == 24 and list(lean.arrays()) == ["sampled_ids"]
    a, b = full.decode(stored(full.encode(z, sample_ids=ids, positions=pos))), None
    block = stored(lean.encode(z, sample_ids=ids, positions=pos))
    assert lean.validate(block) == [] and (np.diff(block["sampled_ids"].astype(int), axis=-1) >= 0).all()
    b = lean.decode(block)
    s1 = torch.randn(rows, c, dtype=torch.float64, requires_grad=True)
    loss = make_soft_loss("sampled_kl", 2.0)
    (g1,) = torch.autograd.grad(loss(s1, a).sum(), s1)
    (g2,) = torch.autograd.grad(loss(s1, b).sum(), s1)
    torch.testing.assert_close(g1, g2)
    with pytest.raises(ConfigError, match="ids-only sampled store holds the draws but not the teacher's logits"):
        kd.divergence("reverse_kl", s1, b, 2.0)
    bad = {"sampled_ids": block["sampled_ids"][:, ::-1].copy()}
    assert any("ascending" in p for p in lean.validate(bad))


def test_sampled_at_another_t_is_refused_naming_td() -> None:
    layout = make_layout("sampled", num_classes=10, samples=4, temperature=2.0)
    target = layout.decode(stored(layout.encode(torch.randn(3, 10), sample_ids=torch.arange(3),
                                                positions=torch.zeros(3, dtype=torch.long))))
    with pytest.raises(ConfigError, match=r"was drawn at T = 2 and answers only that T exactly, not T = 1; pass "
                                          r"temperature=2, or regenerate it with 'softlabels generate --layout "
                                          r"sampled --sample-temperature 1'"):
        make_soft_loss("sampled_kl", 1.0)(torch.randn(3, 10), target)


# -- validators ------------------------------------------------------------------------------------
def test_validator_catches_a_grid_that_disagrees_with_the_arrays_and_impossible_tails() -> None:
    z = torch.randn(4, 12)
    block = stored(make_layout("topk", num_classes=12, k=3, tail_temperatures=[1, 2, 4]).encode(z))
    edited = make_layout("topk", num_classes=12, k=3, tail_temperatures=[1, 2])
    assert "tail_temperatures list 2" in edited.validate(block)[0]
    layout = make_layout("topk", num_classes=12, k=3, tail_temperatures=[1, 2, 4])
    high = {**block, "tail_logsumexp": block["tail_logsumexp"] + 5}
    assert any("exceeds what the classes not stored can hold" in p for p in layout.validate(high))
    nan = {**block, "tail_logsumexp": np.full_like(block["tail_logsumexp"], np.nan)}
    assert any("NaN" in p for p in layout.validate(nan))
    swapped = {**block, "topk_indices": block["topk_indices"].copy()}
    swapped["topk_indices"][0, 1] = swapped["topk_indices"][0, 0]
    assert any("twice" in p for p in layout.validate(swapped))
    with pytest.raises(ConfigError, match=r"tail_temperatures must hold numbers, got \['1', '2'\]"):
        make_layout("topk", num_classes=12, k=3, tail_temperatures=["1", "2"])  # a hand-edited store's grid


@pytest.mark.parametrize("text", ["0,1", "1,nan", "1,inf", "2,2", "-1", "a,b", ""])
def test_bad_grids_are_one_line_errors(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_grid(text)
    assert "\n" not in str(err.value)


# -- defaults by store kind --------------------------------------------------------------------------
def test_defaults_by_store_kind() -> None:
    assert choose(None, None, layout="dense", positions="sample", supported=None)[:2] == (2.0, 0.5)
    assert choose(None, None, layout="topk", positions="sample", supported=(1.0, 2.0, 4.0))[:2] == (1.0, SPARSE_ALPHA)
    assert choose(None, None, layout="sampled", positions="tokens", supported=(2.0,))[:2] == (2.0, SPARSE_ALPHA)
    assert choose(None, None, layout="dense", positions="tokens", supported=None)[:2] == (1.0, SPARSE_ALPHA)
    assert choose(3.0, 0.2, layout="topk", positions="sample", supported=(1.0,))[2] is None


# -- old stores, end to end through the CLI ------------------------------------------------------------
def refused(result, *needles: str) -> None:
    """Exit status 2 and one ``error:`` line (after any ``inputs for ...`` line) holding every needle."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.strip().splitlines()[-1] == errors[0], result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def _train(store: str, out: Path, *extra: str):
    return run_cli("train", "--student", "mlp", "--store", store, "--out", str(out), "--epochs", "1",
                   "--batch-size", "16", "--no-progress", *extra)


@pytest.mark.parametrize("name", ["topk.h5", "topk.zarr"])
def test_format1_topk_stores_train_at_t1_and_refuse_t2(name: str, tmp_path: Path) -> None:
    store = str(FIXTURES / name)
    data = ("--data", str(FIXTURES / "inputs.npz"))
    r = _train(store, tmp_path / "a", *data)
    assert r.exit_code == 0, r.output
    assert "T = 1 and alpha = 0.5: the default for a topk sample store" in r.output
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["config"]["temperature"] == 1.0
    r = _train(store, tmp_path / "b", *data, "--temperature", "2")
    refused(r, f"{store} records its top-k tails at T = 1 and answers only that T exactly, not T = 2",
                          "--tail-temperatures 1,2", "written before top-k stores recorded")
    assert not (tmp_path / "b").exists()


def test_legacy_format2_topk_store_trains_at_t1_and_refuses_t2(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((24, 6)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x, y=np.zeros(24, np.int64))
    rows = make_rows(24, 5, layout="topk", k=2)
    rows["sample_ids"] = np.arange(24)
    store = write_store(tmp_path / "old.h5", rows, num_classes=5, source={"spec": str(tmp_path / "x.npz")})
    with open_store(store) as s:
        assert s.meta.temperatures() == (1.0,) and "logsumexp" in s.meta.arrays()
    assert _train(str(store), tmp_path / "a", "--temperature", "1").exit_code == 0
    refused(_train(str(store), tmp_path / "b", "--temperature", "2"), "answers only that T exactly")


def test_generate_records_the_grid_and_draw_temperature_and_refuses_bad_values(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x, y=np.arange(20) % 4)
    gen = ("generate", "--teacher", "mlp", "--random-teacher", "--data", str(tmp_path / "x.npz"))
    r = run_cli(*gen, "--out", str(tmp_path / "k.h5"), "--layout", "topk", "--topk", "2",
                "--tail-temperatures", "4,1,2")
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "k.h5") as s:
        assert s.meta.layout_params["tail_temperatures"] == [1.0, 2.0, 4.0] and s.meta.temperatures() == (1, 2, 4)
    r = run_cli(*gen, "--out", str(tmp_path / "s.h5"), "--layout", "sampled", "--sample-temperature", "2",
                "--sampled-ids-only")
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "s.h5") as s:
        assert s.meta.layout_params["temperature"] == 2.0 and s.meta.layout_params["logits"] is False
    for bad, needle in ((("--layout", "topk", "--topk", "2", "--tail-temperatures", "1,1"), "twice"),
                        (("--layout", "topk", "--topk", "2", "--tail-temperatures", "0,1"), "between 0.01 and 1000"),
                        (("--layout", "topk", "--topk", "2", "--tail-temperatures", "1,nan"), "between 0.01 and 1000"),
                        (("--layout", "topk", "--topk", "2", "--tail-temperatures", "1,1e300"), "between 0.01 and 1000"),
                        (("--layout", "sampled", "--sample-temperature", "0"), "between 0.01 and 1000"),
                        (("--layout", "sampled", "--sample-temperature", "1e-300"), "between 0.01 and 1000"),
                        (("--layout", "sampled", "--sample-temperature", "-inf"), "between 0.01 and 1000")):
        out = tmp_path / "bad.h5"
        assert_one_line_error(run_cli(*gen, "--out", str(out), *bad), needle)
        assert not out.exists()
    r = run_cli("train", "--student", "mlp", "--store", str(tmp_path / "k.h5"), "--out", str(tmp_path / "r"),
                "--epochs", "1", "--no-progress", "--temperature", "3")
    refused(r, "pass --temperature 1, 2 or 4")
    r = run_cli("train", "--student", "mlp", "--store", str(tmp_path / "s.h5"), "--out", str(tmp_path / "r2"),
                "--epochs", "1", "--no-progress")
    assert r.exit_code == 0 and "T = 2 and alpha = 0.5: the default for a sampled sample store" in r.output, r.output


def test_merge_answers_the_t_it_was_made_at_and_refuses_what_a_member_cannot_answer(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x, y=np.arange(16) % 4)
    for seed in (0, 1):
        r = run_cli("generate", "--teacher", "mlp", "--random-teacher", "--seed", str(seed), "--data",
                    str(tmp_path / "x.npz"), "--out", str(tmp_path / f"t{seed}.h5"), "--layout", "topk", "--topk", "2",
                    "--tail-temperatures", "1,2")
        assert r.exit_code == 0, r.output
    merge = ("merge", "--store", str(tmp_path / "t0.h5"), "--store", str(tmp_path / "t1.h5"))
    refused(run_cli(*merge, "--out", str(tmp_path / "m4.h5"), "--temperature", "4"),
            "answers only those exactly, not T = 4")
    assert not (tmp_path / "m4.h5").exists()
    r = run_cli(*merge, "--out", str(tmp_path / "m2.h5"), "--temperature", "2")
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "m2.h5") as m:
        assert m.meta.temperatures() == (2.0,)
    r = run_cli("train", "--student", "mlp", "--store", str(tmp_path / "m2.h5"), "--out", str(tmp_path / "r"),
                "--epochs", "1", "--no-progress", "--temperature", "1")
    refused(r, "answers only that T exactly, not T = 1")
