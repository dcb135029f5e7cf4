"""An ``hf:`` teacher's store against transformers' own forward on the same windows.

The dense float32 store of a tiny random Llama, GPT-2 and Qwen2 must equal
``model(input_ids, attention_mask).logits`` of ``AutoModelForCausalLM.from_pretrained`` on the
same windows, the short final window included (right-padded inside a call of full windows);
``amp="bf16"`` runs the teacher in bfloat16: same shape, finite, close to float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._chatdata import CORPUS
from tests._hfmodels import hf_model_dir

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SEQ_LEN = 24


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(" ".join(CORPUS))
    return path


def _store_logits(tmp_path, model_dir, text, **kwargs) -> np.ndarray:
    from softlabels.store.reader import UnitStore
    from softlabels.teacher.job import generate

    out = tmp_path / "s.h5"
    generate(f"hf:{model_dir}", f"text:{text}", out, layout="dense", dtype="float32", seq_len=SEQ_LEN,
             batch_size=3, threads=1, **kwargs)
    with UnitStore(out) as store:
        return np.concatenate([store.read_unit(u)["logits"] for u in range(store.num_units)])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_dense_store_equals_transformers_forward(tmp_path, text, arch):
    from softlabels.inputs.text import resolve_token_data

    model_dir = hf_model_dir(tmp_path / arch, arch)
    stored = _store_logits(tmp_path, model_dir, text)  # the teacher's own tokenizer: no --tokenizer
    data = resolve_token_data(f"text:{text}", tokenizer=model_dir / "tokenizer.json", seq_len=SEQ_LEN)
    lengths = data.lengths()
    assert lengths[-1] < SEQ_LEN and len(lengths) % 3 != 1  # the short last window shares a call
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = data.get_batch(np.arange(len(lengths)))
    with torch.no_grad():
        padded = model(input_ids=batch.ids, attention_mask=batch.valid.long()).logits[batch.valid]
        alone = torch.cat([model(input_ids=batch.ids[i:i + 1, :n], attention_mask=torch.ones(1, int(n),
                                 dtype=torch.long)).logits[0] for i, n in enumerate(lengths)])
    assert stored.dtype == np.float32 and stored.shape == (int(lengths.sum()), model.config.vocab_size)
    assert np.abs(stored - padded.numpy()).max() <= 1e-5
    assert np.abs(stored - alone.numpy()).max() <= 1e-5


def test_bf16_amp_runs_the_teacher_in_bfloat16(tmp_path, text):
    model_dir = hf_model_dir(tmp_path / "llama", "llama")
    fp32 = _store_logits(tmp_path / "a", model_dir, text)
    bf16 = _store_logits(tmp_path / "b", model_dir, text, amp="bf16")
    assert bf16.shape == fp32.shape and np.isfinite(bf16).all()
    assert not np.array_equal(bf16, fp32)  # it did run in bfloat16
    scale = np.abs(fp32).max()
    assert np.abs(bf16 - fp32).max() <= 0.02 * scale + 1e-3


def test_an_embedding_padded_beyond_the_tokenizer(tmp_path, text):
    """Qwen2 has 151,936 output rows for 151,665 tokens: the store takes the model's width, the ids the tokenizer's."""
    from tokenizers import Tokenizer

    model_dir = hf_model_dir(tmp_path / "qwen2", "qwen2", vocab_size=336)
    assert Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size() < 336
    stored = _store_logits(tmp_path, model_dir, text)
    assert stored.shape[1] == 336 and np.isfinite(stored).all()
