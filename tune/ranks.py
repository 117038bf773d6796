"""Rank prior for sweeps: read the spectrum of each target weight, propose a per-module rank.

The utilised rank of a weight is the fewest singular values holding `sweep.rank_prior`
of its energy (sum of S²). The pre-pass runs once on the driver, on the starting weights
(`model.init`), writes `rank_prior.json` into the sweep folder and becomes the base
config's `finetune.rank_pattern`; the sweep then searches the global budget multiplier
`finetune.rank_scale` around it (plus the method and the usual hyperparameters):

    sweep:
      rank_prior: 0.9
      space:
        finetune.rank_scale: {loguniform: [0.05, 1.0]}
        finetune.method: {choice: [lora, svfit]}

    .venv/bin/python -c "from system.config import build_config; from tune.ranks import spectrum_prior; \
print(spectrum_prior(build_config({'model': {'name': 'test_resnet'}}), 0.9))"
"""

from __future__ import annotations

import re

from system.adapters.registry import target_modules
from system.adapters.svfit import energy_rank
from system.config import JobConfig
from system.models.artifact import create_backbone, load_backbone_weights


def spectrum_prior(cfg: JobConfig, energy: float) -> dict[str, int]:
    """{escaped module name (a rank_pattern key): utilised rank at `energy`} for the target weights."""
    backbone = create_backbone(cfg.model.name, cfg.model.kwargs)
    if cfg.model.init:
        load_backbone_weights(backbone, cfg.model.init)
    modules = target_modules(backbone, cfg.finetune.target_modules)
    return {re.escape(name): energy_rank(module.weight, energy) for name, module in modules.items()}


def describe(prior: dict[str, int]) -> str:
    ranks = sorted(prior.values())
    median = ranks[len(ranks) // 2]
    return f"{len(ranks)} modules, utilised rank min {ranks[0]}, median {median}, max {ranks[-1]}"
