"""What the peft-based methods (lora, dora, pissa, loha, ia3) share: ranks, configs, save, merge.

Per-module ranks: `finetune.rank_pattern` (regex -> rank, peft's matching rule), all scaled
by the global budget `finetune.rank_scale`. Kept apart from lora.py so each method file
imports only this helper and the registry.
"""

from __future__ import annotations

import re

from pydantic import Field
from torch import nn

from system.adapters.registry import RankOptions, pattern_rank, scaled, target_modules
from system.options import PERTURBABLE


class LoraOptions(RankOptions):
    """LoRA's options beyond the rank: lora, dora, pissa and loha read them."""

    alpha: float | None = Field(None, gt=0, description="LoRA alpha; none = 2 x rank")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA dropout (loha: rank dropout)", json_schema_extra=PERTURBABLE
    )


def module_ranks(backbone: nn.Module, cfg, linear_only: bool = False) -> dict[str, int]:
    """{target module name: rank}: rank_pattern or rank, times rank_scale, at most the weight's rank."""
    ranks = {}
    for name, module in target_modules(backbone, cfg.target_modules).items():
        if linear_only and not isinstance(module, nn.Linear):
            continue
        limit = min(module.weight.shape[0], module.weight[0].numel())
        ranks[name] = scaled(pattern_rank(name, cfg) or cfg.rank, cfg, limit)
    return ranks


def rank_options(backbone: nn.Module, cfg, linear_only: bool = False) -> dict:
    """peft's rank options with explicit per-module ranks (exact names), so peft and we agree on them.

    Shared by the peft methods with a rank (LoRA's config names alpha `lora_alpha`, LoHa's `alpha`).
    """
    ranks = module_ranks(backbone, cfg, linear_only)
    if not ranks:
        raise ValueError(f"finetune.target_modules: no Linear layer among the targets of {cfg.method}")
    base = scaled(cfg.rank, cfg)
    pattern = {re.escape(name): r for name, r in ranks.items() if r != base}
    # alpha = 2 x rank by default: the update's scale (alpha / r) stays the same at every rank.
    return {
        "r": base,
        "alpha": cfg.alpha or 2 * base,
        "target_modules": sorted(ranks),
        "rank_pattern": pattern,
        "alpha_pattern": {} if cfg.alpha else {key: 2 * r for key, r in pattern.items()},
    }


def lora_config(backbone: nn.Module, cfg, linear_only: bool = False, **extra):
    from peft import LoraConfig

    options = rank_options(backbone, cfg, linear_only)
    return LoraConfig(lora_alpha=options.pop("alpha"), lora_dropout=cfg.dropout, **options, **extra)


def merge_peft(backbone):
    return backbone.merge_and_unload()


def save_peft(backbone, folder):
    backbone.save_pretrained(str(folder))


def load_peft(backbone, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(backbone, str(folder))
