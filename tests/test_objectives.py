"""Each objective against a reference computation, and Matryoshka prefixes each trained.

In-process, real timm models in tiny configurations; the distributed versions are in
tests/test_parallel.py.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn import functional as F

from system.config import ObjectiveConfig
from system.objectives.registry import OBJECTIVES, get_objective
from system.objectives.rotation import rotate_batch
from system.objectives.simclr import nt_xent


def tiny_backbone():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0)


# One row per registered objective (a new one adds its row): options for a small run.
ROWS = {
    "simclr": {"proj_dim": 16, "temperature": 0.5},
    "supervised": {"label_smoothing": 0.1},
    "rotation": {},
    "mae": {"mask_ratio": 0.5},
}


def test_every_registered_objective_is_in_the_matrix():
    assert set(OBJECTIVES) == set(ROWS)
    with pytest.raises(ValueError, match="objective.name"):
        get_objective("nope")


@pytest.mark.parametrize("name", ROWS)
def test_objective_contract(name):
    """Its options are `objective.*` keys, and the batch holds only what it declares (views, labels):
    a loss, and gradients into the backbone."""
    cls = get_objective(name)
    assert cls.views in (1, 2) and set(cls.options.model_fields if cls.options else ()) <= set(
        ObjectiveConfig.model_fields
    )
    backbone = tiny_backbone()
    objective = cls(backbone.num_features, ObjectiveConfig(name=name, **ROWS[name]), 3, backbone=backbone)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    batch = {"image": images} if cls.views == 1 else {"view1": images, "view2": images.flip(-1)}
    if cls.labels:
        batch["label"] = torch.arange(6) % 3
    loss, extra = objective(backbone, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and isinstance(extra, dict)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


def test_nt_xent_equals_the_textbook_formula():
    """NT-Xent written out pair by pair (Chen et al., 2020, eq. 1) over 2N samples."""
    gen = torch.Generator().manual_seed(0)
    z1, z2, tau = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = torch.stack([z[i] @ z[k] / tau for k in range(2 * n) if k != i])
        total += -(z[i] @ z[j] / tau - torch.logsumexp(sims, 0))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total.item() / (2 * n), rel=1e-5)


def test_rotation_loss_is_cross_entropy_of_rotated_images():
    backbone = tiny_backbone()
    objective = get_objective("rotation")(backbone.num_features, ObjectiveConfig(name="rotation"))
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(7)
    loss, extra = objective(backbone, {"image": images})
    torch.manual_seed(7)
    turns = torch.randint(0, 4, (4,))
    rotated = torch.stack([torch.rot90(images[i], int(turns[i]), dims=(1, 2)) for i in range(4)])
    expected = F.cross_entropy(objective.classifiers.heads[0](backbone(rotated)), turns)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.0 <= extra["rotation_acc"] <= 1.0
    # Four quarter turns are the identity; one turn is not.
    assert torch.equal(
        rotate_batch(rotate_batch(rotate_batch(rotate_batch(images, turns), turns), turns), turns), images
    )
    assert not torch.equal(rotate_batch(images, torch.ones(4, dtype=torch.long)), images)


@pytest.mark.parametrize("name", ["simclr", "supervised", "rotation"])
def test_matryoshka_trains_every_prefix(name):
    """With dims [16, 64], each prefix has its own loss term and each one goes down."""
    backbone = tiny_backbone()
    cfg = ObjectiveConfig(name=name, matryoshka_dims=[16, 64], proj_dim=16)
    objective = get_objective(name)(backbone.num_features, cfg, num_classes=3)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 32, 32, generator=gen)
    batch = {"image": images, "label": torch.arange(12) % 3, "view1": images, "view2": images.flip(-1)}
    params = list(backbone.parameters()) + list(objective.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    history = []
    for _ in range(8):
        torch.manual_seed(2)  # the same rotations every step: the loss is a fixed function
        loss, extra = objective(backbone, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: float(v) for k, v in extra.items() if k.startswith("loss_d")})
    assert set(history[0]) == {"loss_d16", "loss_d64", f"loss_d{backbone.num_features}"}
    for key in history[0]:
        assert history[-1][key] < history[0][key], (key, history[0][key], history[-1][key])


def test_matryoshka_dims_larger_than_the_embedding_are_refused():
    with pytest.raises(ValueError, match="objective.matryoshka_dims"):
        get_objective("simclr")(64, ObjectiveConfig(matryoshka_dims=[32, 128]))


def test_patchify_follows_the_patch_embedding_order():
    """Patch k of patchify is what a stride-p convolution sees at output position k (unfold)."""
    from system.objectives.mae import patchify

    images = torch.randn(2, 3, 32, 32)
    reference = F.unfold(images, kernel_size=8, stride=8).transpose(1, 2)  # [B, N, C*p*p], channel-major
    ours = patchify(images, 8).reshape(2, 16, 8 * 8, 3).permute(0, 1, 3, 2).reshape(2, 16, -1)
    torch.testing.assert_close(ours, reference)


def test_mae_learns_to_reconstruct_and_refuses_cnns():
    backbone = tiny_backbone()
    objective = get_objective("mae")(backbone.num_features, ObjectiveConfig(name="mae"), backbone=backbone)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(list(backbone.parameters()) + list(objective.parameters()), lr=1e-3)
    losses = []
    for _ in range(10):
        torch.manual_seed(3)  # the same masks every step: a fixed function to minimise
        loss, extra = objective(backbone, {"image": images})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert extra["visible_patches"] == 4  # 25% of 16 patches
    assert losses[-1] < 0.8 * losses[0], losses  # normalised-pixel MSE starts near 1
    with pytest.raises(ValueError, match="objective.name: mae needs a timm VisionTransformer"):
        get_objective("mae")(64, ObjectiveConfig(name="mae"), backbone=timm.create_model("test_resnet"))
