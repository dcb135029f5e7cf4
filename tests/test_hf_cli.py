"""hf:DIR through the real `softlabels` console script, in the environment tools/setup builds.

Tiny random Llama, GPT-2 and Qwen2 models are written here (``AutoConfig`` +
``from_config`` + ``save_pretrained(safe_serialization=True)``) with a ``tokenizer.json``
trained by the ``tokenizers`` library on CPython's own help text; nothing is downloaded.
A broken optional package is reproduced as it breaks in the wild: an installed
``torchvision`` whose import raises the RuntimeError a CUDA build raises under a CPU torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._hfmodels import SIZES as ARCHITECTURES

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SCRIPT = Path(sys.executable).parent / "softlabels"  # the console script of this environment
SEQ_LEN = 32

# What `import torchvision` raises when a CUDA wheel meets a CPU torch (torchvision 0.28.0, torch 2.13.0+cpu).
BROKEN_TORCHVISION = '''
import torch

raise RuntimeError("operator torchvision::nms does not exist")
'''


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> Path:
    """DIR/t.txt, and DIR/<arch>/ (config, model.safetensors, tokenizer.json) for each architecture."""
    import pydoc_data.topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf")
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:4])[:6000]
    (root / "t.txt").write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for name, sizes in ARCHITECTURES.items():
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(name, vocab_size=tok.get_vocab_size(), **sizes)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / name, safe_serialization=True)
        tok.save(str(root / name / "tokenizer.json"))
    return root


def softlabels(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


def generate(root: Path, arch: str, out: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return softlabels("generate", "--teacher", f"hf:{arch}", "--data", "text:t.txt", "--tokenizer",
                      f"{arch}/tokenizer.json", "--seq-len", SEQ_LEN, "--out", out, "--layout", "sampled",
                      "--samples", 4, "--no-progress", cwd=root, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_generate_from_a_hugging_face_directory_and_verify(hf_dirs, arch):
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}; run the tests with the environment tools/setup builds"
    r = generate(hf_dirs, arch, f"{arch}.zarr")
    assert r.returncode == 0, r.stderr
    assert f"to {arch}.zarr" in r.stdout and "tokens" in r.stdout, r.stdout
    r = softlabels("inspect", "--verify", f"{arch}.zarr", cwd=hf_dirs)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all chunks verified" in r.stdout and '"kind": "tokens"' in r.stdout, r.stdout


def test_a_broken_torchvision_is_named_with_its_fix(hf_dirs, tmp_path):
    """An installed torchvision that fails to import: the one line names it and the fix, not the model."""
    site = tmp_path / "site"
    (site / "torchvision").mkdir(parents=True)
    (site / "torchvision" / "__init__.py").write_text(BROKEN_TORCHVISION)
    info = site / "torchvision-0.28.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    (info / "top_level.txt").write_text("torchvision\n")
    pythonpath = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    r = generate(hf_dirs, "llama", str(tmp_path / "s.zarr"), env={"PYTHONPATH": pythonpath})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load hf:llama: "), r.stderr
    import torch

    assert (f"transformers cannot be imported because torchvision 0.28.0 does not load under torch "
            f"{torch.__version__} (RuntimeError: operator torchvision::nms does not exist)") in lines[0], lines[0]
    assert lines[0].endswith("; pip uninstall torchvision, or install the torchvision built for this torch")
    assert "check the model directory" not in lines[0]
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow
def test_teacher_directory_to_a_student_transformers_loads(hf_dirs, tmp_path):
    """The walk-through of docs/TOKENS.md through the console script: the teacher's own tokenizer, a pretrained
    student of its family, RUN/hf loaded by transformers, eval of RUN/hf."""
    import torch

    r = softlabels("generate", "--teacher", "hf:llama", "--data", "text:t.txt", "--seq-len", SEQ_LEN, "--out",
                   tmp_path / "s.zarr", "--layout", "sampled", "--samples", 12, "--no-progress", cwd=hf_dirs)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = softlabels("train", "--student", "hf:llama", "--store", tmp_path / "s.zarr", "--epochs", 1, "--batch-size", 8,
                   "--out", run, "--no-progress", cwd=hf_dirs)
    assert r.returncode == 0, r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "hf")
    assert transformers.AutoTokenizer.from_pretrained(run / "hf")("hello")["input_ids"]
    ids = torch.arange(SEQ_LEN)[None] % model.config.vocab_size
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    r = softlabels("eval", "--checkpoint", run / "hf", "--data", "text:t.txt", "--store", tmp_path / "s.zarr",
                   "--json", cwd=hf_dirs)
    assert r.returncode == 0, r.stderr
    assert '"perplexity"' in r.stdout and '"kl_to_teacher"' in r.stdout
