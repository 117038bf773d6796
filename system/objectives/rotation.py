"""Rotation prediction (Gidaris et al., 2018): a cheap self-supervised baseline.

Each image is rotated by a random multiple of 90 degrees and a linear head on the
embedding predicts which (4-way cross-entropy). Needs square inputs, which the
preprocessing always produces.

    .venv/bin/python -m pytest -q tests/test_objectives.py -k rotation
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from system.objectives.registry import PrefixHeads, nested_dims, register_objective, sum_over_prefixes


def rotate_batch(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """images [N, C, H, W] each rotated by its own number of quarter turns (0..3)."""
    return torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(images, quarter_turns)])


@register_objective("rotation")
class Rotation(nn.Module):
    def __init__(self, embed_dim: int, cfg, num_classes: int = 0, backbone=None):
        super().__init__()
        self.classifiers = PrefixHeads(nested_dims(cfg, embed_dim), lambda d: nn.Linear(d, 4))

    def forward(self, backbone: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        images = batch["image"]
        turns = torch.randint(0, 4, (images.shape[0],), device=images.device)
        outputs = self.classifiers(backbone(rotate_batch(images, turns)))
        terms = [(d, F.cross_entropy(logits, turns)) for d, logits in outputs]
        accuracy = (outputs[-1][1].argmax(-1) == turns).float().mean()
        return sum_over_prefixes(terms, {"rotation_acc": accuracy.detach()})
