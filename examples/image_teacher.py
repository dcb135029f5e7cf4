"""An image teacher of your own (a ``module:factory`` spec) run through ``generate`` over augmented views.

The teacher here is a user-written ``nn.Module`` (timm or torchvision models plug in the same way:
a factory returning the module). ``generate`` stores V = 4 views per image with each view's
augmentation parameters; the student's loop replays the stored view of each epoch on its own
images (``view_transform="replay"``), so input and target always belong together. Run with no
arguments; it writes images.npz, cnn.pt and views.h5 in the working directory.

    python examples/image_teacher.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import softlabels as sl

torch.manual_seed(0)
torch.set_num_threads(1)
AUGMENT = "crop(8,padding=1)+flip"


class SmallCNN(nn.Module):
    """The user's teacher: any module mapping [B, 1, 8, 8] images to [B, 10] logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_teacher() -> nn.Module:
    """The factory ``generate`` calls (spec ``image_teacher:make_teacher``); weights come from ``weights=``."""
    return SmallCNN()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so the spec's module imports from anywhere
    d = load_digits()
    x, y = (d.images / 16).astype(np.float32)[:, None], d.target.astype(np.int64)  # [N, 1, 8, 8]
    train, test = slice(0, 1400), slice(1400, None)
    np.savez("images.npz", x=x[train], y=y[train])

    teacher = SmallCNN()
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(8):
        for b in torch.randperm(1400).split(64):
            loss = nn.functional.cross_entropy(teacher(torch.from_numpy(x[train][b])), torch.from_numpy(y[train][b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(teacher.state_dict(), "cnn.pt")
    sl.generate(teacher="image_teacher:make_teacher", weights="cnn.pt", data="images.npz", out="views.h5",
                views=4, augment=AUGMENT, layout="topk", topk=5, overwrite=True, progress=False)

    user = TensorDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train]))
    data = sl.with_targets(user, "views.h5", view_transform="replay")
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for epoch in range(4):
        data.set_epoch(epoch)  # each epoch trains on another stored view of every image
        for (xb, yb), targets in DataLoader(data, batch_size=64, shuffle=True, collate_fn=sl.collate):
            loss = sl.kd_loss(student(xb), targets, temperature=1.0, alpha=0.5, labels=yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc_t = float((teacher(torch.from_numpy(x[test])).argmax(-1).numpy() == y[test]).mean())
        acc_s = float((student(torch.from_numpy(x[test])).argmax(-1).numpy() == y[test]).mean())
    print(f"teacher (user factory) test accuracy {acc_t:.3f}; student from 4 stored views x top-5: {acc_s:.3f}")


if __name__ == "__main__":
    main()
