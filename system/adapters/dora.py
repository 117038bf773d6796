"""DoRA (Liu et al., 2024) through peft: LoRA on the direction, plus a trained magnitude per output.

peft's LoraConfig(use_dora=True); everything else (targets, ranks, save, merge) is LoRA's.

    .venv/bin/python -m pytest -q tests/test_adapters.py -k dora
"""

from __future__ import annotations

from system.adapters.peft_common import LoraOptions, load_peft, lora_config, merge_peft, save_peft
from system.adapters.registry import register_adapter


@register_adapter(
    "dora", export=merge_peft, save_adapter=save_peft, load_adapter=load_peft, options=LoraOptions
)
def apply_dora(backbone, cfg):
    from peft import get_peft_model

    return get_peft_model(backbone, lora_config(backbone, cfg, use_dora=True))
