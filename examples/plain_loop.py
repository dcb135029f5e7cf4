"""Distil inside a plain PyTorch loop: your Dataset, your transforms, the teacher's stored top-k targets.

Run with no arguments; it writes digits.npz, teacher.pt and digits-top4.h5 in the working
directory (scikit-learn's 8x8 digits: 1,797 images, 10 classes).

    python examples/plain_loop.py
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

import softlabels as sl
from softlabels.teacher.models import build_model

torch.manual_seed(0)
torch.set_num_threads(1)


class NoisyDigits(Dataset):
    """The user's own dataset: its own transform (pixel noise on training items), items (x, y)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, noise: float = 0.0) -> None:
        self.x, self.y, self.noise = torch.from_numpy(x), torch.from_numpy(y), noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        return (x + self.noise * torch.randn_like(x) if self.noise else x), self.y[i]


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())


def main() -> None:
    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target.astype(np.int64)
    train, test = np.arange(0, 1400), np.arange(1400, len(x))
    np.savez("digits.npz", x=x[train], y=y[train])

    # a teacher, trained here in a few seconds, then run once over the training set into a store
    teacher = build_model("mlp-large", (64,), 10)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(30):
        for b in torch.randperm(len(train)).split(64):
            loss = nn.functional.cross_entropy(teacher(torch.from_numpy(x[train][b])), torch.from_numpy(y[train][b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(teacher.state_dict(), "teacher.pt")
    sl.generate(teacher="mlp-large", weights="teacher.pt", data="digits.npz", out="digits-top4.h5", layout="topk",
                topk=4, overwrite=True, progress=False)

    # your loop: your dataset paired with its stored targets by sample id (here: the index)
    data = sl.with_targets(NoisyDigits(x[train], y[train], noise=0.1), "digits-top4.h5")
    loader = DataLoader(data, batch_size=64, shuffle=True, collate_fn=sl.collate)
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for epoch in range(8):
        for (xb, yb), targets in loader:
            loss = sl.kd_loss(student(xb), targets, temperature=1.0, alpha=0.5, labels=yb)  # top-k KL + CE
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch}: loss {loss.item():.3f}")
    print(f"teacher test accuracy {accuracy(teacher, x[test], y[test]):.3f}, "
          f"student (top-4 targets) {accuracy(student, x[test], y[test]):.3f}")


if __name__ == "__main__":
    main()
