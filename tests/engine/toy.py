"""Test fixtures for the engine: a deterministic synthetic dataset, the tiny Spikformer the
distributed tests train, and a small conv+BN classifier for the in-process unit tests.

ToyNet has BatchNorm (buffers in exports), dropout, and timm's `group_matcher`/`no_weight_decay`
hooks (so layer-wise lr decay has real layers), like the Spikformer classifier.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 4
IMG = 16
# the model the distributed tests train (timm name + create_model kwargs, as an export records them)
VARIANT = "spikformer_v2_tiny"
VARIANT_KWARGS = {"num_classes": NUM_CLASSES, "img_size": IMG, "in_chans": 1, "drop_path_rate": 0.1}


def create_spikformer() -> nn.Module:
    import timm

    import models  # noqa: F401  (registers the Spikformer variants with timm)

    return timm.create_model(VARIANT, **VARIANT_KWARGS)


class ToyNet(nn.Module):
    def __init__(self, width: int = 8, depth: int = 2, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()) for _ in range(depth)
        )
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for blk in self.block:
            x = x + blk(x)
        return self.head(self.drop(x.mean(dim=(2, 3))))

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^block\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        return set()


def sample(index: int) -> tuple[torch.Tensor, int]:
    """Image `index` (1 x IMG x IMG): a bright quadrant chosen by the class, plus seeded noise."""
    label = index % NUM_CLASSES
    g = torch.Generator().manual_seed(1000 + index)
    img = 0.5 * torch.randn(1, IMG, IMG, generator=g)
    r, c = divmod(label, 2)
    half = IMG // 2
    img[:, r * half : (r + 1) * half, c * half : (c + 1) * half] += 1.0
    return img, label


def epoch_batches(epoch: int, rank: int, world: int, *, size: int, micro: int, seed: int = 0) -> list[tuple]:
    """This rank's micro-batches (images, labels, ids) of `epoch`: a function of (seed, epoch, rank)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    mine = order[rank::world].tolist()
    batches = []
    for start in range(0, len(mine) - micro + 1, micro):
        ids = mine[start : start + micro]
        imgs, labels = zip(*(sample(i) for i in ids), strict=True)
        batches.append((torch.stack(imgs), torch.tensor(labels), torch.tensor(ids)))
    return batches


def relu_firing_rates(module: nn.Module, batch: tuple) -> dict[str, float]:
    """Stand-in for models.energy.firing_rates: fraction of positive ReLU outputs per layer."""
    rates: dict[str, float] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: rates.__setitem__(name, (out > 0).float().mean().item()))
        for name, m in module.named_modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        module(batch[0])
    finally:
        for h in hooks:
            h.remove()
    return rates
