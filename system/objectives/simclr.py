"""SimCLR (Chen et al., 2020): NT-Xent over two augmented views.

With several workers, each worker's embeddings are gathered from all workers with
gradients (torch.distributed.nn.all_gather), so every worker contrasts its rows with
the global batch: the mean of the workers' losses equals the single-process loss on
the same global batch, and DDP's gradient averaging then matches it too.

    .venv/bin/python -m pytest -q tests/test_objectives.py -k "nt_xent or simclr"
    .venv/bin/python -m pytest -q tests/test_parallel.py -k nt_xent
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from system.metrics import alignment, uniformity
from system.objectives.registry import PrefixHeads, nested_dims, register_objective, sum_over_prefixes
from system.options import PERTURBABLE, Options


class SimclrOptions(Options):
    temperature: float = Field(0.2, gt=0, description="NT-Xent temperature", json_schema_extra=PERTURBABLE)
    proj_dim: int = Field(128, ge=1, description="projection head output size")


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All workers' rows (this worker's rows keep their gradient path); returns (rows, offset)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x)
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean NT-Xent of the local rows of z1/z2 against the global batch of both views."""
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    all1, offset = gather_with_grad(z1)
    all2, _ = gather_with_grad(z2)
    n_global, n_local = all1.shape[0], z1.shape[0]
    keys = torch.cat([all1, all2])  # [2N, d]: view-1 rows then view-2 rows
    queries = torch.cat([z1, z2])  # [2n, d]
    logits = queries @ keys.T / temperature
    local = torch.arange(n_local, device=z1.device) + offset
    self_index = torch.cat([local, local + n_global])  # each query's own column is masked out
    positive = torch.cat([local + n_global, local])  # the other view of the same image
    rows = torch.arange(2 * n_local, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_index] = True
    return F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), positive)


@register_objective("simclr", options=SimclrOptions, views=2)
class SimCLR(nn.Module):
    def __init__(self, embed_dim: int, cfg, num_classes: int = 0, backbone=None):
        super().__init__()
        self.temperature = cfg.temperature
        self.projectors = PrefixHeads(
            nested_dims(cfg, embed_dim),
            lambda d: nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, cfg.proj_dim)),
        )

    def forward(self, backbone: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        h1, h2 = backbone(batch["view1"]), backbone(batch["view2"])
        terms = [
            (d, nt_xent(z1, z2, self.temperature))
            for (d, z1), (_, z2) in zip(self.projectors(h1), self.projectors(h2))
        ]
        # Alignment and uniformity of this batch's embeddings: cheap, and they show
        # collapse (uniformity near 0) long before kNN accuracy does.
        extra = {"alignment": alignment(h1.detach(), h2.detach()), "uniformity": uniformity(h1.detach())}
        return sum_over_prefixes(terms, extra)
