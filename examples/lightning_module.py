"""Distil inside a Lightning ``LightningModule``: stored dense teacher logits, any temperature.

Needs the ``lightning`` package (``pip install 'softlabels[examples]'``). Run with no arguments;
it writes digits.npz and digits.h5 in the working directory.

    python examples/lightning_module.py
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import softlabels as sl

torch.set_num_threads(1)
L.seed_everything(0, verbose=False)


class Distilled(L.LightningModule):
    """A student whose training step adds the stored-target KD term to the label CE."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.kd = sl.KDLoss(temperature=temperature, alpha=alpha)  # loss=None: the layout's own (dense: kl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        (x, y), targets = batch  # Lightning moves tensors and dataclasses with .to() to the device
        loss = self.kd(self(x), targets, y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main() -> None:
    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target.astype(np.int64)
    np.savez("digits.npz", x=x[:1400], y=y[:1400])
    # a teacher of random weights stands in for yours here; `weights=` loads a trained one
    sl.generate(teacher="mlp-large", random_teacher=True, data="digits.npz", out="digits.h5", layout="dense",
                overwrite=True, progress=False)
    user = TensorDataset(torch.from_numpy(x[:1400]), torch.from_numpy(y[:1400]))
    loader = DataLoader(sl.with_targets(user, "digits.h5"), batch_size=64, shuffle=True, collate_fn=sl.collate)
    model = Distilled()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x[1400:])).argmax(-1).numpy() == y[1400:]).mean())
    print(f"lightning: {trainer.current_epoch} epochs, last loss {trainer.callback_metrics['train_loss']:.3f}, "
          f"student test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
