"""LoRA (Hu et al., 2021) through HF peft on a timm backbone.

peft wraps the backbone (PeftModel) and injects low-rank A/B matrices into the target
modules; everything else is frozen. The adapter saves in peft's own format and merges
back into plain weights for serving. The rank options are peft_common's.

    .venv/bin/python -m pytest -q tests/test_adapters.py -k lora
"""

from __future__ import annotations

from system.adapters.peft_common import LoraOptions, load_peft, lora_config, merge_peft, save_peft
from system.adapters.registry import register_adapter


@register_adapter(
    "lora", export=merge_peft, save_adapter=save_peft, load_adapter=load_peft, options=LoraOptions
)
def apply_lora(backbone, cfg):
    from peft import get_peft_model

    return get_peft_model(backbone, lora_config(backbone, cfg))
