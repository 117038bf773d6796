"""Masked autoencoder (He et al., 2022) for timm Vision Transformers.

The encoder (the backbone's own patch embedding and blocks) sees only a random
`objective.mask_ratio` share of the patches left visible; a light decoder (one timm
transformer block) fills in mask tokens and predicts the pixels of every patch; the
loss is the mean squared error on the masked patches, against per-patch normalised
pixels (the paper's best target). Only ViTs: CNNs have no patch tokens to drop.

    .venv/bin/python -m pytest -q tests/test_objectives.py -k "mae or patchify"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import nn

from system.objectives.registry import register_objective
from system.options import PERTURBABLE, Options

if TYPE_CHECKING:  # timm imported when an MAE is built: system.config imports this file for its options
    from timm.models.vision_transformer import VisionTransformer

DECODER_DIM = 128


def vit_of(backbone: nn.Module) -> VisionTransformer:
    from timm.models.vision_transformer import VisionTransformer

    model = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"objective.name: mae needs a timm VisionTransformer, not {type(model).__name__}")
    if model.no_embed_class or model.num_prefix_tokens != 1 or model.pos_embed is None:
        raise ValueError(
            "objective.name: mae supports ViTs with one class token and a learned position embedding"
        )
    return model


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch*patch*C], patches in the patch embedding's (row-major) order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_keep(batch: int, patches: int, keep: int, device) -> torch.Tensor:
    """Indices of the visible patches of each image: a random subset of size `keep`, sorted."""
    return torch.rand(batch, patches, device=device).argsort(dim=1)[:, :keep].sort(dim=1).values


class MaeOptions(Options):
    mask_ratio: float = Field(
        0.75, gt=0, lt=1, description="share of patches masked", json_schema_extra=PERTURBABLE
    )


@register_objective("mae", options=MaeOptions)
class MAE(nn.Module):
    def __init__(self, embed_dim: int, cfg, num_classes: int = 0, backbone: nn.Module | None = None):
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        super().__init__()
        vit = vit_of(backbone)
        if cfg.matryoshka_dims:
            raise ValueError(
                "objective.matryoshka_dims: mae reconstructs pixels; it trains no embedding prefixes"
            )
        self.mask_ratio = cfg.mask_ratio
        self.patch = vit.patch_embed.patch_size[0]
        patches = vit.patch_embed.num_patches
        self.decoder_embed = nn.Linear(embed_dim, DECODER_DIM)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DECODER_DIM))
        self.decoder_pos = nn.Parameter(torch.zeros(1, patches, DECODER_DIM))
        self.decoder = Block(DECODER_DIM, num_heads=4)
        self.decoder_norm = nn.LayerNorm(DECODER_DIM)
        self.to_pixels = nn.Linear(DECODER_DIM, self.patch * self.patch * 3)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.decoder_pos, std=0.02)

    def encode_visible(self, vit: VisionTransformer, images: torch.Tensor, keep_idx: torch.Tensor):
        tokens = vit.patch_embed(images) + vit.pos_embed[:, 1:]
        visible = tokens.gather(1, keep_idx[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(images.shape[0], -1, -1)
        x = vit.norm_pre(torch.cat([cls, visible], dim=1))
        return vit.norm(vit.blocks(x))[:, 1:]

    def forward(self, backbone: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        vit = vit_of(backbone)
        images = batch["image"]
        b, n = images.shape[0], self.decoder_pos.shape[1]
        keep = max(1, int(n * (1 - self.mask_ratio)))
        keep_idx = random_keep(b, n, keep, images.device)
        encoded = self.decoder_embed(self.encode_visible(vit, images, keep_idx))
        # Every position starts as the mask token; the visible ones get their encoding back.
        full = self.mask_token.expand(b, n, -1).clone()
        full = full.scatter(1, keep_idx[..., None].expand(-1, -1, full.shape[-1]), encoded)
        predicted = self.to_pixels(self.decoder_norm(self.decoder(full + self.decoder_pos)))
        target = patchify(images, self.patch)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = torch.ones(b, n, device=images.device).scatter(1, keep_idx, 0.0)
        per_patch = (predicted - target).pow(2).mean(-1)
        loss = (per_patch * masked).sum() / masked.sum()
        return loss, {"visible_patches": float(keep)}
