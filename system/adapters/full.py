"""`full`: every backbone weight trains; `linear`: the backbone is frozen, only the head trains."""

from __future__ import annotations

from system.adapters import register_adapter


def _identity(backbone):
    return backbone


@register_adapter("full", export=_identity)
def apply_full(backbone, cfg):
    backbone.requires_grad_(True)
    return backbone


@register_adapter("linear", export=_identity)
def apply_linear(backbone, cfg):
    backbone.requires_grad_(False)
    return backbone
