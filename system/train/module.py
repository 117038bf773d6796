"""The training module (backbone + objective), without Ray: what a Train worker runs.

Kept apart from system/train.py (the Ray Train driver and worker loop) so that the
plain-PyTorch benchmarks, which also run on GPU machines without Ray, build exactly the
module a `repforge pretrain` / `finetune` worker builds.

    .venv/bin/python -m pytest -q tests/test_parallel.py -k bf16
"""

from __future__ import annotations

from torch import nn

from system.adapters.registry import get_adapter
from system.config import JobConfig
from system.models.artifact import create_backbone, load_backbone_weights
from system.objectives.compatible import with_compatibility
from system.objectives.registry import get_objective


class TrainModule(nn.Module):
    """Backbone + objective as one module, so DDP sees (and syncs) every trainable weight."""

    def __init__(self, backbone: nn.Module, objective: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.objective = objective

    def forward(self, batch: dict):
        return self.objective(self.backbone, batch)


def build_model(cfg: JobConfig, job: str, num_classes: int) -> TrainModule:
    backbone = create_backbone(cfg.model.name, cfg.model.kwargs, cfg.model.pretrained)
    if cfg.model.init:
        load_backbone_weights(backbone, cfg.model.init)
    timm_model = backbone  # before an adapter wraps it: compatible_with reads its preprocessing
    if job == "finetune":
        backbone = get_adapter(cfg.finetune.method).apply(backbone, cfg.finetune)
        objective = get_objective("supervised")(backbone.num_features, cfg.objective, num_classes)
    else:
        objective_cls = get_objective(cfg.objective.name)
        objective = objective_cls(backbone.num_features, cfg.objective, num_classes, backbone=backbone)
    return TrainModule(backbone, with_compatibility(objective, cfg, timm_model, num_classes))


def train_mode(module: nn.Module) -> None:
    """module.train(), except batch norms whose weights are frozen keep their running stats.

    Otherwise a LoRA or linear fine-tune would silently change the frozen backbone through
    its BatchNorm statistics, and the saved adapter would no longer reproduce the model.
    """
    module.train()
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in layer.parameters(recurse=False)):
                layer.eval()
