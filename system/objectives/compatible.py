"""Backward-compatible training (BCT, Shen et al., 2020): the new model's embeddings are
trained to work against an old model's gallery, with no change to the old model.

`objective.compatible_with: OLD_MODEL_URI` wraps the job's objective (any that embeds whole
images: supervised, simclr, rotation; fine-tunes too). The old model is frozen and kept out
of the module's parameters and state dict (no DDP sync, no checkpoint weight). Every image
batch the backbone embeds is also embedded by the old model (converted to its
preprocessing), and an influence loss, weighted by `objective.compat_weight`, is added:

  instance     every batch: InfoNCE of each new (L2-normalised) embedding against the old
               embeddings of the global batch (gathered from all workers), at temperature
               TEMPERATURE: its own image's old embedding is the positive.
  prototypes   labelled data, added to the instance term: cross-entropy of the new embedding
               against the old model's class prototypes (running means of its normalised
               embeddings of the training data, summed across workers): BCT's influence loss
               with the old classifier replaced by the old class means.

Retrieval is judged per image, not per class: on CIFAR-10 (bench_compat.py, 6,000 gallery
images, old 150 steps, new 400) the prototype term alone left new/old at 0.354 against
old/old 0.381; with the instance term added, 0.399 (new/new 0.489 against an unconstrained
0.520). On digits, 0.989 against 0.969, new/new 0.56 pt under the unconstrained model.

The old model's own linear head is not used: it scores unnormalised features, not the
cosine retrieval uses. On digits (old 50 steps, new 150, bench_compat.py's setup) old/old
was 0.972; new/old 0.978 with the prototypes, 0.944 with the head added to them (and
0.958 with the head alone in a plain-torch prototype against old/old 0.989).

    .venv/bin/python -m pytest -q tests/test_compat.py -k objective
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from system.objectives.simclr import gather_with_grad

TEMPERATURE = 0.1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def to_old_inputs(images: torch.Tensor, new_pre: dict, old_pre: dict) -> torch.Tensor:
    """Images normalised for the new model, re-normalised (and resized) for the old one."""
    if all(new_pre.get(k) == old_pre.get(k) for k in ("size", "mean", "std")):
        return images
    shape = (1, -1, 1, 1)
    mean_new, std_new = (images.new_tensor(new_pre[k]).view(shape) for k in ("mean", "std"))
    mean_old, std_old = (images.new_tensor(old_pre[k]).view(shape) for k in ("mean", "std"))
    raw = images * std_new + mean_new
    if raw.shape[-1] != old_pre["size"]:
        raw = F.interpolate(raw, size=(old_pre["size"],) * 2, mode="bilinear", align_corners=False)
    return (raw - mean_old) / std_old


class CompatibleObjective(nn.Module):
    """The job's objective plus the influence loss towards a frozen old model."""

    def __init__(self, inner: nn.Module, cfg, embed_dim: int, num_classes: int, new_pre: dict):
        super().__init__()
        from system.models.artifact import load_artifact

        if getattr(inner, "name", "") == "mae":
            raise ValueError(
                "objective.compatible_with: mae embeds no whole images; use simclr or supervised"
            )
        try:
            old, meta = load_artifact(cfg.compatible_with)
        except (ValueError, OSError) as err:
            raise ValueError(f"objective.compatible_with: {str(err).splitlines()[0]}") from None
        if meta["embedding_dim"] != embed_dim:
            raise ValueError(
                f"objective.compatible_with: the old model embeds in {meta['embedding_dim']} dims, this one "
                f"in {embed_dim}; train a model of the same width, or fit an adapter (repforge compat fit)"
            )
        for p in old.parameters():
            p.requires_grad_(False)
        self.inner, self.weight = inner, cfg.compat_weight
        self.new_pre, self.old_pre = new_pre, meta["preprocessing"]
        self.old_fingerprint = meta["fingerprint"]
        # In a list: not a submodule, so neither DDP, FSDP, the optimizer nor checkpoints see it.
        self._old = [old]
        self.labelled = num_classes >= 2
        self._sums = torch.zeros(num_classes, embed_dim) if self.labelled else None
        self._counts = torch.zeros(num_classes) if self.labelled else None

    @property
    def views(self) -> int:
        return self.inner.views

    @property
    def head(self) -> nn.Module:
        """The job's own head (the exported classifier), as the inner objective's."""
        return self.inner.head

    def old_model(self, device) -> nn.Module:
        old = self._old[0]
        if next(old.parameters()).device != device:
            self._old[0] = old = old.to(device)
        return old.eval()

    def forward(self, backbone: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = backbone.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
        try:
            loss, extra = self.inner(backbone, batch)
        finally:
            hook.remove()
        if not seen:
            raise ValueError("objective.compatible_with: this objective never embedded the batch's images")
        labels = batch.get("label") if self.labelled else None
        compat = sum(self.influence(images, new, labels) for images, new in seen) / len(seen)
        extra["compat_loss"] = compat.detach()
        return loss + self.weight * compat, extra

    def influence(self, images: torch.Tensor, new: torch.Tensor, labels) -> torch.Tensor:
        old_model = self.old_model(images.device)
        with torch.no_grad():
            old_features = old_model.backbone(to_old_inputs(images, self.new_pre, self.old_pre))
            old = F.normalize(old_features.float(), dim=-1)
        new_unit = F.normalize(new.float(), dim=-1)
        keys, offset = gather_with_grad(old)  # no gradient flows into the frozen old model anyway
        targets = torch.arange(len(new), device=new.device) + offset
        instance = F.cross_entropy(new_unit @ keys.T / TEMPERATURE, targets)
        if labels is None:
            return instance
        labels = labels.long()
        logits = new_unit @ self.prototypes(old, labels).T / TEMPERATURE
        classes = F.cross_entropy(logits.masked_fill(self._counts.to(new.device) == 0, float("-inf")), labels)
        return classes + instance

    @torch.no_grad()
    def prototypes(self, old: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Running class means of the old normalised embeddings, this batch (all workers') included."""
        sums = torch.zeros(self._sums.shape, device=old.device).index_add_(0, labels, old)
        counts = torch.bincount(labels, minlength=len(self._counts)).float()
        if _distributed():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        self._sums = self._sums.to(old.device) + sums
        self._counts = self._counts.to(old.device) + counts
        return F.normalize(self._sums / self._counts.clamp(min=1)[:, None], dim=-1)


def with_compatibility(objective: nn.Module, cfg, timm_model: nn.Module, num_classes: int) -> nn.Module:
    """`objective` wrapped for `cfg.objective.compatible_with` (cfg: a JobConfig), or unchanged when unset."""
    if not cfg.objective.compatible_with:
        return objective
    from system.data.transforms import preprocessing_config

    new_pre = preprocessing_config(timm_model, cfg.data.image_size)
    return CompatibleObjective(objective, cfg.objective, timm_model.num_features, num_classes, new_pre)
