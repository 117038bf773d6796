"""Representation-quality metrics computed on embeddings (torch tensors, any device)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 20) -> float:
    """Leave-one-out kNN top-1 (cosine, majority vote) over one labelled set."""
    features = F.normalize(features.float(), dim=-1)
    n = features.shape[0]
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    similarity = features @ features.T
    similarity.fill_diagonal_(float("-inf"))  # a point must not vote for itself
    neighbours = similarity.topk(k, dim=-1).indices
    votes = F.one_hot(labels[neighbours], int(labels.max()) + 1).sum(1)
    return (votes.argmax(-1) == labels).float().mean().item()


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values."""
    singular = torch.linalg.svdvals(features.float())
    p = singular / (singular.sum() + eps) + eps
    return torch.exp(-(p * p.log()).sum()).item()
