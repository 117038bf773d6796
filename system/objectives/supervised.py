"""Supervised cross-entropy on a linear head over the pooled embedding.

Also the fine-tuning objective: the head trained here becomes the classifier head of
the exported model artifact.

    .venv/bin/python -m pytest -q tests/test_objectives.py -k supervised
    .venv/bin/python -m pytest -q tests/test_parallel.py -k bf16
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from system.objectives.registry import PrefixHeads, nested_dims, register_objective, sum_over_prefixes
from system.options import PERTURBABLE, Options


class SupervisedOptions(Options):
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="label smoothing of the head's targets (a finetune's too)",
        json_schema_extra=PERTURBABLE,
    )


@register_objective("supervised", options=SupervisedOptions, labels=True)
class Supervised(nn.Module):
    def __init__(self, embed_dim: int, cfg, num_classes: int = 0, backbone=None):
        super().__init__()
        if num_classes < 2:
            raise ValueError("objective.name: supervised needs a labelled dataset with 2+ classes")
        self.label_smoothing = cfg.label_smoothing
        self.classifiers = PrefixHeads(nested_dims(cfg, embed_dim), lambda d: nn.Linear(d, num_classes))

    @property
    def head(self) -> nn.Linear:
        """The full-embedding classifier: the head of the exported model."""
        return self.classifiers.heads[-1]

    def forward(self, backbone: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        outputs = self.classifiers(backbone(batch["image"]))
        labels = batch["label"].long()
        terms = [(d, F.cross_entropy(lg, labels, label_smoothing=self.label_smoothing)) for d, lg in outputs]
        accuracy = (outputs[-1][1].argmax(-1) == labels).float().mean()
        return sum_over_prefixes(terms, {"train_acc": accuracy.detach()})
