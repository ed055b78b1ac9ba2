"""Small reference models and plain training loops shared by the examples, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SmallCNN", "tiny_vit", "batches", "evaluate", "train_steps"]


class SmallCNN(nn.Module):
    """A LeNet-style CNN for 28x28 grey digits (~27 k parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 5)
        self.conv2 = nn.Conv2d(width, 2 * width, 5)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def tiny_vit(num_classes: int = 10, image_size: int = 32, patch_size: int = 4, num_layers: int = 2,
             hidden_dim: int = 64, mlp_dim: int = 128, num_heads: int = 4) -> nn.Module:
    """A small torchvision ``VisionTransformer`` (the real class, scaled down)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                             num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                             num_classes=num_classes)


def batches(x: Tensor, y: Tensor, batch_size: int, *, seed: int, epochs: int | None = None
            ) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled mini-batches, epoch after epoch (forever when ``epochs`` is None), reproducible."""
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]
        epoch += 1


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Classification accuracy in [0, 1] (the model is put in eval mode and restored)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was)
    return correct / len(x)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer,
                data: Iterator[tuple[Tensor, Tensor]], steps: int,
                on_step: Callable[[int, float], None] | None = None) -> float:
    """``steps`` plain cross-entropy steps; returns the last loss."""
    model.train()
    loss_v = float("nan")
    for i in range(steps):
        xb, yb = next(data)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        loss_v = loss.item()
        if on_step is not None:
            on_step(i, loss_v)
    return loss_v
