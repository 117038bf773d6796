"""Supervised cross-entropy on a linear head over the pooled embedding.

Also the fine-tuning objective: the head trained here becomes the classifier head of
the exported model artifact.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from system.objectives import register_objective


@register_objective("supervised")
class Supervised(nn.Module):
    views = 1

    def __init__(self, embed_dim: int, cfg, num_classes: int = 0):
        super().__init__()
        if num_classes < 2:
            raise ValueError("objective.name: supervised needs a labelled dataset with 2+ classes")
        self.label_smoothing = cfg.label_smoothing
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, backbone: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.head(backbone(batch["image"]))
        labels = batch["label"].long()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return loss, {"train_acc": accuracy.detach()}
