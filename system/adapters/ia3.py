"""(IA)³ (Liu et al., 2022) through peft: a learned scale per channel of each target, nothing else.

The fewest parameters of the peft methods, and no rank: a target's outputs are scaled
(one number per output feature or channel), except a ViT's `fc2`, whose input (the MLP's
hidden activations) is scaled, as the paper does for the feed-forward layers. Scales
start at 1, so the initial function is the base model's; they merge into the weights.
`finetune.rank`, `rank_pattern` and `rank_scale` do not apply.

    .venv/bin/python -m pytest -q tests/test_adapters.py -k ia3
"""

from __future__ import annotations

import re

from system.adapters.peft_common import load_peft, merge_peft, save_peft
from system.adapters.registry import TargetOptions, register_adapter, target_modules

FEEDFORWARD = r".*\.fc2$"  # scaled on the input side: the MLP's hidden activations


@register_adapter(
    "ia3", export=merge_peft, save_adapter=save_peft, load_adapter=load_peft, options=TargetOptions
)
def apply_ia3(backbone, cfg):
    from peft import IA3Config, get_peft_model

    targets = sorted(target_modules(backbone, cfg.target_modules))
    feedforward = [name for name in targets if re.fullmatch(FEEDFORWARD, name)]
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward)
    return get_peft_model(backbone, config)
