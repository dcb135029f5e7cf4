"""Causal-LM specs: the built-in GPT, module:factory wrappers and local Hugging Face models."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from softlabels.errors import DataError, ModelMismatch, SpecError
from softlabels.teacher.lm import BUILTIN_LMS, build_lm, resolve_lm

V, CTX = 97, 24


@pytest.mark.parametrize("name", sorted(BUILTIN_LMS))
def test_gpt_shapes_and_causality(name):
    model = build_lm(name, V, CTX).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (3, CTX), generator=g)
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (3, CTX, V) and logits.dtype == torch.float32
        for t in (0, 7, CTX - 1):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            other = model(changed)
            torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=1e-6)  # past: untouched
            assert (other[:, t:] - logits[:, t:]).abs().amax() > 1e-4  # the changed token and later see it


def test_right_padding_leaves_real_positions_alone():
    model = build_lm("gpt-small", V, CTX).eval()
    ids = torch.randint(0, V, (1, 10))
    padded = torch.cat([ids, torch.zeros((1, 6), dtype=torch.int64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[:, :10], model(ids), rtol=0, atol=1e-5)


def test_init_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_lm("gpt-tiny", V, CTX, seed=5).state_dict()
    assert torch.equal(torch.rand(3), before)
    b = build_lm("gpt-tiny", V, CTX, seed=5).state_dict()
    c = build_lm("gpt-tiny", V, CTX, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok.weight"], c["tok.weight"])


def test_sizes_and_context():
    tiny = resolve_lm("gpt-tiny", vocab_size=4096, context=128)
    medium = resolve_lm("gpt-medium", vocab_size=4096, context=128)
    assert medium.num_parameters >= 10 * tiny.num_parameters  # teacher/student ratio of the benchmarks
    assert tiny.vocab_size == 4096 and tiny.kind == "builtin" and tiny.weights_sha256 is None
    with pytest.raises(ModelMismatch, match="exceed the model's context of 128"):
        tiny.module(torch.zeros((1, 129), dtype=torch.int64))
    with pytest.raises(DataError, match="token id 4096 is outside the vocabulary"):
        tiny.module(torch.tensor([[1, 4096]]))
    with pytest.raises(ModelMismatch, match="sized by the vocabulary"):
        resolve_lm("gpt-tiny")
    with pytest.raises(SpecError, match="unknown language model"):
        resolve_lm("gpt-huge", vocab_size=10)


def test_weights_round_trip(tmp_path):
    model = build_lm("gpt-tiny", V, CTX, seed=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    info = resolve_lm("gpt-tiny", vocab_size=V, context=CTX, seed=2, weights=tmp_path / "w.pt")
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(info.module(ids), model.eval()(ids))
    assert info.weights_sha256 and len(info.weights_sha256) == 64


class _Plain(nn.Module):
    def __init__(self, v: int = V) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, v)

    def forward(self, ids):
        return self.emb(ids)


class _HFStyle(_Plain):
    def forward(self, ids):
        return SimpleNamespace(logits=super().forward(ids), past_key_values=None)


class _Flat(_Plain):
    def forward(self, ids):
        return super().forward(ids)[:, -1]


@pytest.fixture
def factories(monkeypatch):
    module = SimpleNamespace(plain=_Plain, hf_style=_HFStyle, flat=_Flat, wide=lambda: _Plain(V + 3))
    monkeypatch.setitem(sys.modules, "lm_factories", module)


def test_factory_outputs_are_normalised(factories):
    ids = torch.randint(0, V, (2, 5))
    plain = resolve_lm("lm_factories:plain", vocab_size=V)
    hf = resolve_lm("lm_factories:hf_style")
    assert plain.kind == hf.kind == "factory" and hf.vocab_size == V
    torch.manual_seed(0)
    assert resolve_lm("lm_factories:hf_style").module(ids).shape == (2, 5, V)
    with pytest.raises(ModelMismatch, match=r"returned \(1, 97\) for ids of shape \(1, 1\)"):
        resolve_lm("lm_factories:flat")
    with pytest.raises(ModelMismatch, match="outputs 100 logits per token but the vocabulary has 97"):
        resolve_lm("lm_factories:wide", vocab_size=V)


@pytest.fixture
def gpt2_dir(tmp_path):
    """A tiny randomly initialised GPT-2 saved with safetensors (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=16, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    return tmp_path / "gpt2", model


def test_hf_model_loads_locally_and_matches(gpt2_dir):
    path, model = gpt2_dir
    info = resolve_lm(f"hf:{path}", vocab_size=V)
    assert info.kind == "hf" and info.vocab_size == V and len(info.weights_sha256) == 64
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(info.module(ids), model(ids).logits)
        changed = ids.clone()
        changed[:, 5] = (changed[:, 5] + 1) % V
        torch.testing.assert_close(info.module(changed)[:, :5], info.module(ids)[:, :5])


def test_hf_refuses_pickled_weights_and_non_model_dirs(gpt2_dir, tmp_path):
    path, _ = gpt2_dir
    (path / "model.safetensors").rename(path / "pytorch_model.bin")  # what a pickle-era checkpoint looks like
    with pytest.raises(SpecError, match=r"no \.safetensors weights \(only pytorch_model\.bin\); pickled weights"):
        resolve_lm(f"hf:{path}")
    with pytest.raises(SpecError, match="no config.json"):
        resolve_lm(f"hf:{tmp_path / 'nothing'}")
    (path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SpecError, match=f"cannot load hf:{path}"):
        resolve_lm(f"hf:{path}")


_LOAD_HF = """
import logging, sys
from softlabels.teacher.lm import resolve_lm
info = resolve_lm("hf:" + sys.argv[1])
print(info.vocab_size)
# the filter lived only while the model loaded: torch's own record of it still reaches stderr afterwards
logging.getLogger("torch.utils._pytree").warning("later: register_constant() on an Enum")
"""


def test_loading_an_hf_model_prints_no_pytree_deprecation(gpt2_dir):
    """transformers' lazy imports (torchao's Enums) made torch log a `register_constant()` deprecation on every
    hf: load; it is hidden while softlabels loads the model, and only then (a fresh process: logged once)."""
    import subprocess
    from pathlib import Path

    path, _ = gpt2_dir
    p = subprocess.run([sys.executable, "-c", _LOAD_HF, str(path)], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and p.stdout.strip() == str(V), p.stderr
    lines = [line for line in p.stderr.splitlines() if "register_constant()" in line]
    assert len(lines) == 1 and "later: register_constant() on an Enum" in lines[0], p.stderr
