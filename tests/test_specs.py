"""Model specs: built-ins, module:factory, TorchScript, torch.export, weights; model sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softlabels.errors import ModelMismatch, SpecError
from softlabels.teacher.models import (
    BUILTIN_MODELS,
    build_model,
    count_flops,
    count_parameters,
)
from softlabels.teacher.spec import ModelInfo, resolve_model, sha256_file

DIGITS = {"input_shape": (64,), "num_classes": 10}


def _x(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtins_resolve_deterministically(name):
    torch.manual_seed(0)
    info = resolve_model(name, **DIGITS)
    torch.manual_seed(0)
    again = resolve_model(name, **DIGITS)
    assert isinstance(info, ModelInfo) and info.kind == "builtin" and info.weights_sha256 is None
    assert not info.module.training
    out = info.module(_x())
    assert out.shape == (5, 10)
    torch.testing.assert_close(again.module(_x()), out, rtol=0, atol=0)
    assert info.num_parameters == sum(p.numel() for p in info.module.parameters())
    assert info.metadata() == {
        "spec": name, "kind": "builtin", "weights_sha256": None, "num_parameters": info.num_parameters
    }


def test_parameter_counts_and_flops():
    mlp = build_model("mlp", (64,), 10)
    assert count_parameters(mlp) == 64 * 32 + 32 + 32 * 10 + 10
    assert count_flops(mlp, (64,)) == 64 * 32 + 32 * 10
    assert count_parameters(build_model("linear", (8, 8), 3)) == 64 * 3 + 3
    assert count_flops(build_model("mlp-large", (64,), 10), (64,)) >= 10 * count_flops(mlp, (64,))
    cnn = build_model("cnn", (64,), 10)
    assert count_flops(build_model("cnn-large", (64,), 10), (64,)) >= 10 * count_flops(cnn, (64,))
    # conv 1->16 on 8x8 (3x3 taps), strided conv 16->32 to 4x4, linear 128->10
    assert count_flops(cnn, (64,)) == 64 * 16 * 9 + 16 * 32 * 16 * 9 + 128 * 10
    assert build_model("cnn", (3, 12, 12), 4)(torch.zeros(2, 3, 12, 12)).shape == (2, 4)


def test_unknown_builtin_and_cnn_on_non_square():
    with pytest.raises(SpecError, match="unknown model 'mlp-huge'; use one of: linear, mlp"):
        resolve_model("mlp-huge", **DIGITS)
    with pytest.raises(ModelMismatch, match="image-like"):
        build_model("cnn", (10,), 3)


def test_module_factory(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(3)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 7))\n"
        "def not_a_model(): return 42\n"
        "def broken(): raise ValueError('bad config')\n"
    )
    (tmp_path / "badimport.py").write_text("import does_not_exist_xyz\ndef make(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    info = resolve_model("usermodels:make", **DIGITS)
    import usermodels

    assert info.kind == "factory" and info.num_parameters == 64 * 7 + 7
    torch.testing.assert_close(info.module(_x()), usermodels.make()(_x()), rtol=0, atol=0)
    with pytest.raises(SpecError, match="returned int, not a torch.nn.Module"):
        resolve_model("usermodels:not_a_model", **DIGITS)
    with pytest.raises(SpecError, match="raised ValueError: bad config"):
        resolve_model("usermodels:broken", **DIGITS)
    with pytest.raises(SpecError, match="no attribute 'nope'"):
        resolve_model("usermodels:nope", **DIGITS)
    with pytest.raises(SpecError, match="cannot import module 'badimport'.*does_not_exist_xyz") as err:
        resolve_model("badimport:make", **DIGITS)
    assert isinstance(err.value.__cause__, ImportError) and "\n" not in str(err.value)


def test_torchscript_and_export_files(tmp_path):
    torch.manual_seed(0)
    original = build_model("cnn", (64,), 10).eval()
    expected = original(_x())
    torch.jit.save(torch.jit.trace(original, _x(2)), tmp_path / "m.ts")
    program = torch.export.export(
        original, (_x(4),), dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}}
    )
    torch.export.save(program, tmp_path / "m.pt2")
    for name, kind in [("m.ts", "torchscript"), ("m.pt2", "export")]:
        info = resolve_model(str(tmp_path / name), **DIGITS)
        assert info.kind == kind and info.weights_sha256 == sha256_file(tmp_path / name)
        assert info.num_parameters == count_parameters(original)
        torch.testing.assert_close(info.module(_x()), expected)
    with pytest.raises(SpecError, match="does not exist"):
        resolve_model(str(tmp_path / "gone.pt2"), **DIGITS)
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(SpecError, match="pass it as weights with an architecture spec"):
        resolve_model(str(tmp_path / "weights.pt"), **DIGITS)


def test_weights_round_trip_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = build_model("mlp", (64,), 10)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    torch.save({"model": trained.state_dict(), "step": 7}, tmp_path / "ckpt.pt")
    torch.manual_seed(123)  # a different random init, overwritten by the weights
    for file in ("w.pt", "ckpt.pt"):
        info = resolve_model("mlp", **DIGITS, weights=tmp_path / file)
        assert info.weights_sha256 == sha256_file(tmp_path / file)
        torch.testing.assert_close(info.module(_x()), trained(_x()), rtol=0, atol=0)


def test_wrong_weights_raise_model_mismatch(tmp_path):
    torch.save(build_model("mlp", (64,), 3).state_dict(), tmp_path / "three.pt")
    with pytest.raises(ModelMismatch, match=r"shape mismatch net.3.weight \(3, 32\) vs model \(10, 32\)"):
        resolve_model("mlp", **DIGITS, weights=tmp_path / "three.pt")
    torch.save(build_model("linear", (64,), 10).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(ModelMismatch, match=r"missing keys net.3.weight, net.3.bias; shape") as err:
        resolve_model("mlp", **DIGITS, weights=tmp_path / "linear.pt")
    assert "\n" not in str(err.value)
    torch.save(build_model("mlp-large", (64,), 10).state_dict(), tmp_path / "large.pt")
    with pytest.raises(ModelMismatch, match=r"unexpected keys net.5.weight, net.5.bias"):
        resolve_model("mlp", **DIGITS, weights=tmp_path / "large.pt")


class _Opaque:
    """Not a tensor: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.state = nn.Linear(64, 10).state_dict()


def test_pickled_weights_need_allow_pickle(tmp_path):
    torch.manual_seed(0)
    model = build_model("linear", (64,), 10)
    torch.save({"model": model.state_dict(), "extra": _Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(SpecError, match="refusing to unpickle.*--allow-pickle") as err:
        resolve_model("linear", **DIGITS, weights=tmp_path / "pickled.pt")
    assert "\n" not in str(err.value)
    info = resolve_model("linear", **DIGITS, weights=tmp_path / "pickled.pt", allow_pickle=True)
    torch.testing.assert_close(info.module(_x()), model(_x()), rtol=0, atol=0)
    torch.save(_Opaque(), tmp_path / "object.pt")
    with pytest.raises(SpecError, match="not a state_dict"):
        resolve_model("linear", **DIGITS, weights=tmp_path / "object.pt", allow_pickle=True)
