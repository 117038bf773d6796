"""Optimizers and the learning-rate schedule shared by pretraining and fine-tuning.

AdamW and SGD come from torch, LARS from timm (`timm.optim.Lars`: the layer-wise trust
ratio is applied only to parameter groups with weight decay, so norms and biases are
excluded from it as in the LARS/SimCLR papers).

    .venv/bin/python -m pytest -q tests/test_train_fsdp.py -k time_budget
"""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(module: nn.Module, lr: float, weight_decay: float, head_prefix: str, head_scale: float):
    """No weight decay on norms and biases (1-D tensors); parameters under `head_prefix` get lr x scale."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim <= 1 else weight_decay
        group_lr = lr * (head_scale if name.startswith(head_prefix) else 1.0)
        groups.setdefault((group_lr, decay), []).append(param)
    return [{"params": p, "lr": glr, "weight_decay": wd} for (glr, wd), p in groups.items()]


def build_optimizer(module: nn.Module, train_cfg, head_scale: float = 1.0) -> torch.optim.Optimizer:
    """`train.optimizer`: adamw | sgd | lars, over the trainable parameters of `module`."""
    groups = parameter_groups(module, train_cfg.lr, train_cfg.weight_decay, "objective.", head_scale)
    if train_cfg.optimizer == "adamw":
        # One fused kernel for all parameters on GPUs (torchtitan's default), not a loop of them.
        on_gpu = all(p.is_cuda for group in groups for p in group["params"])
        return torch.optim.AdamW(groups, fused=on_gpu and bool(groups))
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=train_cfg.momentum, nesterov=train_cfg.momentum > 0)
    from timm.optim import Lars

    return Lars(groups, lr=train_cfg.lr, momentum=train_cfg.momentum)


def cosine_with_warmup(optimizer, warmup: int, total: int, step: int = 0):
    """Linear warmup for `warmup` steps, then cosine decay to zero at `total`; from `step` on
    (a schedule swapped in mid-run), setting the optimizer's lr for that step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # LambdaLR steps once on creation, hence step - 1.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)
