"""LoHa (Hyeon-Woo et al., 2022, FedPara) through peft: the update is a Hadamard product of two LoRAs.

ΔW = (B1·A1) ⊙ (B2·A2): twice LoRA's parameters at the same rank, but an update of rank up
to r², so it reaches further per parameter. Works on Linear and Conv2d targets (a conv's
kernel is flattened, as LoRA does). Ranks, targets, save and merge are LoRA's.

    .venv/bin/python -m pytest -q tests/test_adapters.py -k loha
"""

from __future__ import annotations

from system.adapters.peft_common import LoraOptions, load_peft, merge_peft, rank_options, save_peft
from system.adapters.registry import register_adapter


@register_adapter(
    "loha", export=merge_peft, save_adapter=save_peft, load_adapter=load_peft, options=LoraOptions
)
def apply_loha(backbone, cfg):
    from peft import LoHaConfig, get_peft_model

    # LoRA's dropout acts on the input; LoHa's nearest equivalent drops whole ranks.
    config = LoHaConfig(rank_dropout=cfg.dropout, **rank_options(backbone, cfg))
    return get_peft_model(backbone, config)
