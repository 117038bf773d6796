"""Representation-quality metrics computed on embeddings (torch tensors, any device).

knn_accuracy on the quickstart's SimCLR features, against the same network at random init:

    .venv/bin/python -m pytest -q tests/test_train.py -k learned_something
"""

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


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Alignment (Wang & Isola, 2020): mean squared distance of normalised positive pairs (lower: better)."""
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    return (z1 - z2).norm(dim=-1).pow(2).mean().item()


def uniformity(features: torch.Tensor, t: float = 2.0) -> float:
    """Uniformity (Wang & Isola, 2020): log mean Gaussian potential over pairs (lower is better)."""
    z = F.normalize(features.float(), dim=-1)
    return torch.pdist(z).pow(2).mul(-t).exp().mean().log().item()
