"""`norm`: only the affine parameters of the normalisation layers train (plus the head).

Our own (peft has no such method; it is a few lines). BatchNorm layers whose affine
weights train are in train mode, so their running statistics change too: the adapter
saves them with the affine weights. The adapter is a safetensors file + a json file.

    .venv/bin/python -m pytest -q tests/test_adapters.py -k norm
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from system.adapters.registry import ADAPTER_JSON, ADAPTER_WEIGHTS, register_adapter

# timm's LayerNorm/LayerNorm2d/BatchNormAct2d/GroupNorm1 subclass these.
NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.RMSNorm)


def norm_layers(backbone: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in backbone.named_modules() if isinstance(m, NORM_TYPES)}


def _identity(backbone):
    return backbone


def norm_state(backbone: nn.Module) -> dict:
    """The normalisation layers' affine weights and running statistics, by parameter name."""
    state = {}
    for name, layer in norm_layers(backbone).items():
        for key, tensor in layer.state_dict().items():
            state[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    return state


def load_norm_state(backbone: nn.Module, state: dict, folder) -> None:
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"norm adapter does not fit this model: unexpected {unexpected[0]} in {folder}")


def unfreeze_norms(backbone: nn.Module, option: str) -> None:
    """Lets the normalisation layers' affine weights train (the `norm` method, svfit's train_norms)."""
    layers = norm_layers(backbone)
    if not any(p.numel() for layer in layers.values() for p in layer.parameters()):
        raise ValueError(f"{option} needs normalisation layers with affine weights; this model has none")
    for layer in layers.values():
        layer.requires_grad_(True)


def save_norm(backbone, folder):
    state = norm_state(backbone)
    save_file(state, str(Path(folder) / ADAPTER_WEIGHTS))
    (Path(folder) / ADAPTER_JSON).write_text(json.dumps({"method": "norm", "tensors": len(state)}))


def load_norm(backbone, folder):
    load_norm_state(backbone, load_file(str(Path(folder) / ADAPTER_WEIGHTS)), folder)
    return backbone


@register_adapter("norm", export=_identity, save_adapter=save_norm, load_adapter=load_norm)
def apply_norm(backbone, cfg):
    backbone.requires_grad_(False)
    unfreeze_norms(backbone, "finetune.method: norm")
    return backbone
