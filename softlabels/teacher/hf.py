"""Hugging Face causal LMs from a local directory: ``hf:DIR`` loaded, checked and used as an initialisation.

Only what ``save_pretrained`` writes is read, as data: ``config.json`` (JSON, checked
before transformers sees it), ``*.safetensors`` (tensors; pickled ``.bin``/``.pt`` weights
are refused) and nothing fetched or run (``local_files_only``, ``trust_remote_code=False``).
A directory that is not a causal LM, that needs remote code, or whose weights are missing
gets one line naming the directory and the fix before transformers is asked to build it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softlabels.errors import ModelMismatch, SpecError, one_line
from softlabels.teacher.spec import sha256_file

__all__ = ["load_hf", "load_hf_init", "max_positions"]


def _config(directory: str, path: Path) -> dict[str, Any]:
    """``config.json`` as JSON (never code), or the one-line refusal."""
    file = path / "config.json"
    if not file.is_file():
        raise SpecError(f"hf:{directory} is not a Hugging Face model directory (no config.json); "
                        "pass a directory written by save_pretrained")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"hf:{directory} has a config.json that is not JSON ({one_line(err, 300)}); "
                        "re-save the model with save_pretrained") from err
    return config if isinstance(config, dict) else {}


def _check_architecture(directory: str, config: dict[str, Any], transformers: Any) -> None:
    """Refuse, in one line, a model type transformers only knows through remote code, or one that is
    not a causal LM (a config without ``model_type`` is left to transformers to judge)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return
    if model_type not in CONFIG_MAPPING_NAMES:
        if config.get("auto_map"):
            raise SpecError(f"hf:{directory} is a '{model_type}' model that needs remote code (its config.json "
                            "has auto_map), which is never run; use an architecture transformers "
                            f"{transformers.__version__} ships, or convert the checkpoint to one")
        raise SpecError(f"hf:{directory} is a '{model_type}' model, which transformers {transformers.__version__} "
                        "does not know; upgrade transformers, or pass a model of a known architecture")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SpecError(f"hf:{directory} is a '{model_type}' model, not a causal language model (AutoModelForCausalLM "
                        "has no class for it); pass a decoder-only LM such as Llama, Qwen2 or GPT-2")


def load_hf(directory: str) -> tuple[nn.Module, str]:
    """The causal LM saved in ``directory`` (safetensors only, nothing fetched, no remote code) and the
    sha256 of its weights (of the one file, or combined over the shards)."""
    path = Path(directory)
    config = _config(directory, path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        raise SpecError(
            f"hf:{directory} has no .safetensors weights{f' (only {pickled[0]})' if pickled else ''}; "
            "pickled weights are never loaded: re-save with save_pretrained(safe_serialization=True)"
        )
    try:
        import transformers
    except Exception as err:
        _refuse_broken_dependency(directory, err)
        if not isinstance(err, ImportError):
            raise
        raise SpecError(f"hf:{directory} needs 'transformers', which is not installed; "
                        "pip install 'softlabels[lm]'") from err
    _check_architecture(directory, config, transformers)
    transformers.utils.logging.disable_progress_bar()  # one-line output: no loading bars
    try:
        with _no_pytree_enum_deprecation():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True, trust_remote_code=False
            )
    except Exception as err:  # transformers raises many kinds; all mean "cannot load this here"
        _refuse_broken_dependency(directory, err)
        raise SpecError(f"cannot load hf:{directory} ({one_line(err, 300)}); check the model directory") from err
    if len(weights) == 1:
        return model, sha256_file(weights[0])
    shards = "".join(f"{f.name}:{sha256_file(f)}|" for f in weights)  # each shard's name and digest
    return model, hashlib.sha256(shards.encode()).hexdigest()


def load_hf_init(module: nn.Module, spec: str, directory: str) -> str:
    """Copy the weights of the causal LM in ``directory`` into ``module`` (strictly: the same architecture and
    shapes); return their sha256. ``module`` is the student built from ``spec``."""
    source, digest = load_hf(directory)
    given, expected = source.state_dict(), module.state_dict()
    wrong = sorted(set(given) ^ set(expected)) or [k for k in expected if given[k].shape != expected[k].shape]
    if wrong:
        raise ModelMismatch(f"hf:{directory} does not fit student '{spec}' ({type(source).__name__} vs "
                            f"{type(module).__name__}; first differing weight {wrong[0]}); pass --init a checkpoint "
                            "of the student's own architecture and size")
    module.load_state_dict(given, strict=True)
    return digest


def max_positions(module: nn.Module) -> int | None:
    """The longest sequence a transformers model's config allows (``max_position_embeddings``/``n_positions``)."""
    config = getattr(module, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _broken_package(err: BaseException) -> tuple[str, BaseException] | None:
    """The installed package whose own import raised somewhere in ``err``'s chain, with its error.

    transformers imports optional packages (torchvision, for one) lazily when a model class is
    first used; a package that is installed but fails to import then surfaces as an error about
    the model. Its traceback shows the package's module-level code running under an import.
    """
    seen: set[int] = set()
    chain: BaseException | None = err
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        tb = chain.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            top = str(frame.f_globals.get("__name__", "")).partition(".")[0]
            if frame.f_code.co_name == "<module>" and top not in _IMPORTERS:
                return top, chain
            tb = tb.tb_next
        chain = chain.__cause__ or chain.__context__
    return None


_IMPORTERS = {"", "__main__", "importlib", "transformers", "softlabels", "torch"}
"""Modules whose module-level code running under an import is not the broken package (torch's own
modules run under the import of the package that failed)."""


def _refuse_broken_dependency(directory: str, err: BaseException) -> None:
    """Raise the one-line SpecError naming the broken package and its fix, if one broke ``err``."""
    found = _broken_package(err)
    if found is None:
        return
    name, cause = found
    from importlib import metadata

    try:
        version = f" {metadata.version(name)}"
    except metadata.PackageNotFoundError:  # no metadata (a source checkout): the name alone
        version = ""
    fix = f"install the {name} built for this torch" if name.startswith("torch") else f"reinstall {name}"
    raise SpecError(
        f"cannot load hf:{directory}: transformers cannot be imported because {name}{version} does not load "
        f"under torch {torch.__version__} ({one_line(cause, 300)}); pip uninstall {name}, or {fix}"
    ) from err


@contextlib.contextmanager
def _no_pytree_enum_deprecation():
    """Drop, during a load only, the ``torch.utils._pytree`` records naming ``register_constant()``: torchao,
    which transformers' lazy model imports bring in, registers Enum classes as pytree constants and this
    torch warns once per class on stderr."""
    logger = logging.getLogger("torch.utils._pytree")

    def keep(record: logging.LogRecord) -> bool:
        return "register_constant()" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
