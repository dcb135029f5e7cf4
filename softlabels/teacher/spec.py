"""Resolve ``--teacher``/``--student`` model specs to models, and check specs recorded in files.

Model spec grammar: a built-in name (``BUILTIN_MODELS``), ``package.module:factory``, a TorchScript
file or a ``torch.export`` program (``*.pt2``); a file suffix decides between a file and a module.
Specs on the command line are trusted; specs recorded in files are data (:func:`recorded_spec`,
docs/SECURITY.md).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import torch
from torch import nn

from softlabels.errors import ModelMismatch, SpecError, one_line
from softlabels.inputs.spec import _call_factory, data_spec_path
from softlabels.teacher.models import BUILTIN_MODELS, build_model, count_parameters

ModelKind = Literal["builtin", "factory", "torchscript", "export", "module"]
_MODEL_FILE_SUFFIXES = (".pt", ".ts", ".pt2", ".jit")


def factory_module(spec: str) -> nn.Module:
    """The ``nn.Module`` a ``package.module:factory`` model spec returns (SpecError otherwise)."""
    module = _call_factory(spec, "model", nn.Module)
    if not isinstance(module, nn.Module):
        raise SpecError(f"model factory '{spec}' returned {type(module).__name__}, not a torch.nn.Module; "
                        "return the model instance")
    return module


def recorded_spec(spec: Any, *, kind: Literal["data", "model"], where: str, flag: str) -> str:
    """A spec read from a file (``where``), checked to run no code: a built-in, a plain data file or
    an image folder for data; a built-in name only for a model (a TorchScript or ``.pt2`` file is a
    program). Anything else must be named on the command line with ``flag`` (docs/SECURITY.md)."""
    if not isinstance(spec, str) or not spec:
        raise SpecError(f"{where} records no usable {kind} spec ({spec!r}); pass {flag} SPEC")
    ok = (spec.startswith(("digits:", "imagefolder:")) or data_spec_path(spec) is not None) if kind == "data" \
        else spec in BUILTIN_MODELS
    if not ok:
        what = "a program" if kind == "model" and Path(spec).suffix.lower() in _MODEL_FILE_SUFFIXES else "code"
        raise SpecError(f"{where} records the {kind} spec {spec!r}, which names {what}; specs read from files are "
                        f"never imported or run: pass {flag} {spec} explicitly if you trust it")
    return spec


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model (in eval mode) and what identifies it in a store's metadata; the sha256 is
    of the weights file if given, else of the TorchScript/.pt2 file, else ``None``."""

    module: nn.Module
    spec: str
    kind: ModelKind
    weights_sha256: str | None
    num_parameters: int

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the module)."""
        return {k: v for k, v in vars(self).items() if k != "module"}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Entries of a .pt2 archive that torch.export.load unpickles or runs as native code
# whatever the weights_only setting: refused without allow_pickle.
_PT2_UNSAFE = ("data/aotinductor/", "opaque_obj_", "custom_obj_", "data/weights/model.pt",
               "data/constants/model.pt")


def _weights_only_loads() -> Any:
    """Every ``torch.load`` inside with ``weights_only=True`` (torch's documented switch), even
    torch.export.load's own loads of pickled weights, constants and sample inputs."""
    return mock.patch.dict(os.environ, {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"})


def _load_export(path: str, allow_pickle: bool) -> nn.Module:
    """A ``.pt2`` program, loaded without unpickling anything unless ``allow_pickle``."""
    if allow_pickle:
        return torch.export.load(path).module()
    refuse = SpecError(f"refusing to load '{path}': a torch.export program with pickled objects or compiled code; "
                       "pass --allow-pickle only for a file you trust, or re-export it with plain tensors")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []  # not an archive: torch.export.load gives the error
    if any(unsafe in name for name in names for unsafe in _PT2_UNSAFE):
        raise refuse
    try:
        with _weights_only_loads():
            return torch.export.load(path).module()
    except pickle.UnpicklingError as err:
        raise refuse from err


def _load_model_file(path: str, allow_pickle: bool = False) -> tuple[nn.Module, ModelKind]:
    if not Path(path).is_file():
        raise SpecError(f"model file '{path}' does not exist; check the path or use a built-in name")
    kind: ModelKind = "export" if path.lower().endswith(".pt2") else "torchscript"
    try:
        if kind == "export":
            return _load_export(path, allow_pickle), kind
        return torch.jit.load(path, map_location="cpu"), kind
    except SpecError:
        raise
    except Exception as err:
        raise SpecError(
            f"cannot load '{path}' as {'a torch.export program' if kind == 'export' else 'TorchScript'} "
            f"({one_line(err, 300)}); if it holds a state_dict, pass it as weights with an architecture spec"
        ) from err


def is_model_file(spec: str) -> bool:
    """Whether a model spec names a file (by suffix, or because the file exists)."""
    return Path(spec).suffix.lower() in _MODEL_FILE_SUFFIXES or Path(spec).is_file()


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _read_state_dict(path: str, allow_pickle: bool) -> Mapping[str, Any]:
    """The state_dict in a weights file (a checkpoint's ``model`` entry if it is one)."""
    if not Path(path).is_file():
        raise SpecError(f"weights file '{path}' does not exist; check the weights path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if allow_pickle:
            raise SpecError(f"cannot unpickle weights '{path}' ({one_line(err, 300)}); re-save them") from err
        raise SpecError(
            f"refusing to unpickle weights '{path}': it holds objects other than tensors; pass "
            "allow_pickle=True (--allow-pickle) only for a file you trust, or save model.state_dict()"
        ) from err
    except Exception as err:
        raise SpecError(f"cannot read weights '{path}' ({one_line(err, 300)}); save them with "
                        "torch.save(model.state_dict(), path)") from err
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise SpecError(f"weights '{path}' hold a {type(obj).__name__}, not a state_dict; "
                        "save them with torch.save(model.state_dict(), path)")
    return obj


def _load_weights(module: nn.Module, path: str, spec: str, allow_pickle: bool) -> str:
    """Strictly load the weights in ``path`` into ``module`` and return their sha256; ModelMismatch if they
    do not fit."""
    given = dict(_read_state_dict(path, allow_pickle))
    expected = module.state_dict()
    if given and all(k.startswith("module.") for k in given) and not any(k in expected for k in given):
        given = {k.removeprefix("module."): v for k, v in given.items()}  # saved from DDP's wrapper
    problems = []
    if missing := [k for k in expected if k not in given]:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected := [k for k in given if k not in expected]:
        problems.append(f"unexpected keys {_few(unexpected)}")
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in given.items()
             if k in expected and isinstance(v, torch.Tensor) and isinstance(expected[k], torch.Tensor)
             and v.shape != expected[k].shape]
    if wrong:
        problems.append(f"shape mismatch {_few(wrong)}")
    if not problems:
        try:
            module.load_state_dict(given, strict=True)
        except (RuntimeError, ValueError, TypeError) as err:
            problems.append(one_line(err, 300))
    if problems:
        raise ModelMismatch(f"weights '{path}' do not fit model '{spec}': {'; '.join(problems)}; "
                            "pass weights saved from this architecture")
    return sha256_file(path)


def teacher_classes(spec: str, *, input_shape: tuple[int, ...], data_classes: int | None,
                    weights: str | os.PathLike[str] | None = None, allow_pickle: bool = False) -> int | None:
    """The class count to build teacher ``spec`` for, before it runs: for a built-in, the width of
    the class head its weights were saved with (else ``data_classes``); ``None`` for other teachers,
    complete models whose output width gives the count."""
    if spec not in BUILTIN_MODELS:
        return None
    if weights is None:
        return data_classes
    one = build_model(spec, tuple(input_shape), 1).state_dict()
    two = build_model(spec, tuple(input_shape), 2).state_dict()
    given = dict(_read_state_dict(str(weights), allow_pickle))
    # the class head: the one parameter whose shape changes with the class count
    key, a = next((k, a) for k, a in one.items() if a.shape != two[k].shape)
    dim = next(i for i, (m, n) in enumerate(zip(a.shape, two[key].shape)) if m != n)
    saved = given.get(key, given.get(f"module.{key}"))  # a DDP state_dict keeps the wrapper's prefix
    if isinstance(saved, torch.Tensor) and saved.ndim == a.ndim:
        return int(saved.shape[dim]) or data_classes
    return data_classes


def resolve_model(spec: str, *, input_shape: tuple[int, ...], num_classes: int,
                  weights: str | os.PathLike[str] | None = None, allow_pickle: bool = False) -> ModelInfo:
    """Resolve a ``--teacher``/``--student`` spec to a model in eval mode (``input_shape`` and
    ``num_classes`` size the built-ins); ``weights`` load strictly, unpickled only with
    ``allow_pickle`` (trusted files: docs/SECURITY.md)."""
    digest: str | None = None
    kind: ModelKind
    if spec in BUILTIN_MODELS:
        module, kind = build_model(spec, tuple(input_shape), num_classes), "builtin"
    elif is_model_file(spec):
        module, kind = _load_model_file(spec, allow_pickle)
        digest = sha256_file(spec)
    elif ":" in spec:
        module, kind = factory_module(spec), "factory"
    else:
        raise SpecError(f"unknown model '{spec}'; use one of: {', '.join(BUILTIN_MODELS)}, "
                        "a package.module:factory, a TorchScript file or a .pt2 torch.export file")
    if weights is not None:
        digest = _load_weights(module, str(weights), spec, allow_pickle)
    if kind != "export":  # exported programs refuse eval(); they keep the mode they were exported in
        module.eval()
    return ModelInfo(module, spec, kind, digest, count_parameters(module))
