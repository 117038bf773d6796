"""Validation during training: kNN top-1, RankMe, uniformity; accuracy and confusion for fine-tunes.

.venv/bin/python -m pytest -q tests/test_parallel.py -k evaluate
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from system.metrics import knn_accuracy, rankme, uniformity
from system.train.module import TrainModule, train_mode

# Kept in model.json: a confusion matrix is stored only up to this many classes.
MAX_CONFUSION_CLASSES = 100


def confusion_counts(target, predicted, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows: true class) of integer arrays or tensors: one bincount."""
    pairs = np.asarray(target, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)


@torch.no_grad()
def evaluate(module: TrainModule, batches, job: str, bf16: bool) -> dict:
    """Validation metrics on the full val set: kNN top-1, RankMe, uniformity; accuracy for fine-tunes.

    `batches`: the val set's batches (dicts of tensors on the module's device). Under FSDP
    every rank runs it in lockstep (the forward all-gathers parameters) and the root's own
    parameters are gathered explicitly, since the heads run outside its forward. `bf16`
    runs it under bf16 autocast, as on GPUs: needed there under FSDP2, whose gathered
    parameters are bf16 while the input images are fp32.
    """
    module.eval()
    sharded = hasattr(module, "unshard")
    if sharded:
        module.unshard()
    features, labels, correct, correct5, confusion = [], [], 0, 0, None
    for batch in batches:
        with torch.autocast(batch["image"].device.type, torch.bfloat16, enabled=bf16):
            embedding = module.backbone(batch["image"])
            logits = module.objective.head(embedding) if job == "finetune" else None
        if job == "finetune":
            target = batch["label"].long()
            correct += (logits.argmax(-1) == target).sum().item()
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct5 += (top5 == target[:, None]).any(-1).sum().item()
            pairs = target * logits.shape[-1] + logits.argmax(-1)  # (true, predicted) as one index
            counts = torch.bincount(pairs.cpu(), minlength=logits.shape[-1] ** 2)
            confusion = counts if confusion is None else confusion + counts
        features.append(nn.functional.normalize(embedding.float(), dim=-1).cpu())
        if "label" in batch:
            labels.append(batch["label"].cpu())
    if sharded:
        module.reshard()
    train_mode(module)
    if not features:
        return {}
    feats = torch.cat(features)
    metrics = {"rankme": rankme(feats), "val_uniformity": uniformity(feats[:2048])}
    if labels:
        labels = torch.cat(labels).long()
        metrics["knn_acc"] = knn_accuracy(feats, labels, k=20)
        if job == "finetune":
            metrics["val_acc"] = correct / len(labels)
            metrics["val_top5"] = correct5 / len(labels)
            classes = int(confusion.numel() ** 0.5)
            if classes <= MAX_CONFUSION_CLASSES:  # kept in model.json: bounded in size
                metrics["confusion"] = confusion.reshape(classes, classes).tolist()
    return metrics


def per_class_report(confusion: list[list[int]], classes: list[str]) -> dict:
    """Per-class accuracy and the confusion matrix (rows: true class), for model.json."""
    per_class = {name: row[i] / max(1, sum(row)) for i, (name, row) in enumerate(zip(classes, confusion))}
    return {"per_class_acc": per_class, "confusion": confusion}
