"""Distil a causal LM inside ``transformers.Trainer``: a ``compute_loss`` that adds the stored-target KD term.

The text is CPython's own help topics (``pydoc_data.topics``) as bytes (a 256-token vocabulary),
cut into 64-token windows; the teacher is a small GPT-2 made here from a config (random
weights stand in for yours: any ``AutoModelForCausalLM`` directory works as ``hf:DIR``), run once
by ``generate`` into a token store of top-8 logits per token. Run with no arguments; it writes
tokens.npz, teacher/ and tokens.h5 in the working directory.

    python examples/hf_trainer.py
"""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import softlabels as sl

torch.manual_seed(0)
torch.set_num_threads(1)
SEQ, WINDOWS = 64, 96


class DistilTrainer(Trainer):
    """``Trainer`` whose loss is ``alpha * next-token CE + (1 - alpha) * T² KL`` against the stored targets."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs.pop("teacher").to(model.device)
        outputs = model(**inputs)
        loss = sl.kd_loss(outputs.logits, targets, temperature=1.0, alpha=0.5, labels=inputs["labels"])
        return (loss, outputs) if return_outputs else loss


def collate(batch):
    """``softlabels.collate``'s (user batch, targets) as the dict a Trainer hands to ``compute_loss``."""
    inputs, targets = sl.collate(batch)
    return {**inputs, "teacher": targets}


def main() -> None:
    text = " ".join(topics.values()).encode()[: SEQ * WINDOWS]
    tokens = np.frombuffer(text, np.uint8).astype(np.int32)
    np.savez("tokens.npz", tokens=tokens, offsets=np.arange(0, len(tokens) + 1, SEQ))  # one window per sequence
    config = GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained("teacher")
    sl.generate(teacher="hf:teacher", data="tokens.npz", out="tokens.h5", layout="topk", topk=8, overwrite=True,
                progress=False)

    # the user's dataset: dicts of input_ids and labels, as a causal LM takes them; paired by index
    windows = torch.from_numpy(tokens.astype(np.int64)).view(-1, SEQ)
    user = [{"input_ids": w, "labels": w} for w in windows]
    student = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2,
                                         bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir="student", per_device_train_batch_size=16, num_train_epochs=2,
                             learning_rate=3e-3, logging_steps=6, report_to=[], save_strategy="no",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = DistilTrainer(model=student, args=args, train_dataset=sl.with_targets(user, "tokens.h5"),
                            data_collator=collate)
    result = trainer.train()
    print(f"transformers.Trainer: {result.global_step} steps, final KD + CE loss {result.training_loss:.3f}")


if __name__ == "__main__":
    main()
