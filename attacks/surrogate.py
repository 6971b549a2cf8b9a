"""A small CNN classifier the attacker trains on its own data, for triggers that are optimized
against a model (LowFrequency's universal perturbation, InputAware's generator). The victim VLM is
never queried: the references generate these triggers against a surrogate classifier too."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from tasks.base import Sample


def object_labels(samples: Sequence[Sample], classes: Sequence[str]) -> np.ndarray:
    """Class of each image = category of its largest object (the task's scene facts)."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for s in samples:
        objs = s.meta["scene"]["objects"]
        big = max(objs, key=lambda o: o["h"] * o["w"])
        out.append(index[big["category"]])
    return np.asarray(out, dtype=np.int64)


def to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) float images in [0, 1] -> (N, 3, H, W) float32 tensor."""
    return torch.as_tensor(np.stack(list(images)) if not isinstance(images, np.ndarray) else images,
                           dtype=torch.float32).permute(0, 3, 1, 2).contiguous()


def to_images(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) tensor -> (N, H, W, 3) float32 array."""
    return x.detach().permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


class SurrogateCNN(nn.Module):
    """Three conv blocks (16-32-64 channels), global average pool, linear head."""

    def __init__(self, n_classes: int, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                                                  nn.MaxPool2d(2)) for a, b in zip(chans, chans[1:]))
        self.head = nn.Linear(chans[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def train_surrogate(images: torch.Tensor, labels: torch.Tensor, n_classes: int, seed: int, epochs: int = 15,
                    lr: float = 1e-3, batch_size: int = 64, desc: str = "surrogate") -> tuple[SurrogateCNN, float]:
    """Train a SurrogateCNN (Adam, flip augmentation); returns it in eval mode and its train accuracy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SurrogateCNN(n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        model.train()
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch_size):
            idx = perm[i:i + batch_size]
            x = images[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, accuracy(model, images, labels)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([model(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return float((preds == labels).float().mean())
