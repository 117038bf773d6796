"""LoRA (Hu et al., 2021) through HF peft on a timm backbone.

peft wraps the backbone (PeftModel) and injects low-rank A/B matrices into the target
modules; everything else is frozen. The adapter saves in peft's own format and merges
back into plain weights for serving.
"""

from __future__ import annotations

import re

from torch import nn

from system.adapters import register_adapter

# Default targets per family: a ViT's attention and MLP linears, a CNN's convolutions.
VIT_TARGETS = r".*\.(qkv|proj|fc1|fc2)$"
CONV_TARGETS = r".*\.conv\d+$"


def default_targets(backbone: nn.Module) -> str:
    names = [name for name, _ in backbone.named_modules()]
    return VIT_TARGETS if any(re.fullmatch(VIT_TARGETS, n) for n in names) else CONV_TARGETS


def _merge(backbone):
    return backbone.merge_and_unload()


def _save(backbone, folder):
    backbone.save_pretrained(str(folder))


@register_adapter("lora", export=_merge, save_adapter=_save)
def apply_lora(backbone, cfg):
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules or default_targets(backbone)
    if not any(re.fullmatch(targets, name) for name, _ in backbone.named_modules()):
        raise ValueError(f"finetune.target_modules: {targets!r} matches no module of the model")
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha or 2 * cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=targets,
    )
    return get_peft_model(backbone, config)
