"""PiSSA (Meng et al., 2024) through peft: LoRA whose A, B start at the top-r SVD of each weight.

peft's init_lora_weights="pissa" moves the principal part of W into B·A and leaves the
residual in the base layer, so the initial function is unchanged but the base weights are
not. The saved adapter is therefore converted (peft's path_initial_model_for_weight_
conversion) into a plain rank-2r LoRA that applies to the *original* base weights: anyone
can load it with PeftModel.from_pretrained on the base model. peft's PiSSA initialisation
works on 2-D weights only: the family default skips Conv2d layers (a ViT's patch
embedding), an explicit regex naming one is refused, and a CNN has nothing to adapt.

    .venv/bin/python -m pytest -q tests/test_adapters.py -k pissa
"""

from __future__ import annotations

import tempfile

from torch import nn

from system.adapters.peft_common import LoraOptions, load_peft, lora_config, merge_peft
from system.adapters.registry import register_adapter, target_modules


def save_pissa(backbone, folder):
    backbone.save_pretrained(str(folder), path_initial_model_for_weight_conversion=backbone.pissa_initial)


@register_adapter(
    "pissa", export=merge_peft, save_adapter=save_pissa, load_adapter=load_peft, options=LoraOptions
)
def apply_pissa(backbone, cfg):
    from peft import get_peft_model

    targets = target_modules(backbone, cfg.target_modules)
    convs = [n for n, m in targets.items() if isinstance(m, nn.Conv2d)]
    if convs and cfg.target_modules:
        raise ValueError(
            f"finetune.target_modules: pissa adapts Linear layers only, {convs[0]} is a Conv2d "
            f"(set a regex of Linear layers, or use lora/dora/svfit)"
        )
    model = get_peft_model(backbone, lora_config(backbone, cfg, linear_only=True, init_lora_weights="pissa"))
    # The conversion at save time needs the adapter as initialised: kept in a small temp folder.
    model.pissa_initial = tempfile.mkdtemp(prefix="repforge-pissa-init-")
    model.save_pretrained(model.pissa_initial)
    return model
