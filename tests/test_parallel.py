"""Distributed training math checked against the single-process result, on CPU with gloo.

Real torch.distributed process groups (2 processes, gloo) without Ray: the sharding
and loss code is what runs inside the Ray Train workers (tests/test_train.py runs it
there end to end).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from system.adapters.registry import get_adapter
from system.config import FinetuneConfig, ObjectiveConfig, TrainConfig
from system.objectives.simclr import SimCLR, nt_xent
from system.train.checkpoint import full_model_state, load_checkpoint, save_checkpoint
from system.train.parallel import apply_fsdp, residual_blocks

WORLD = 2
STEPS = 3


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` gloo processes; any failure fails the test."""
    # A file rendezvous, not a TCP port: no race with other processes for a free port.
    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{tmp}/rendezvous"
        mp.spawn(_init_and_run, args=(world, store, fn, args), nprocs=world, join=True)


def _init_and_run(rank, world, store, fn, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def tiny_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0)


class Module(nn.Module):
    """Backbone + SimCLR objective, the shape of system.train.module.TrainModule."""

    def __init__(self, method: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = tiny_vit()
        if method:  # a fine-tuning method: most of the backbone frozen, maybe inside a peft wrapper
            self.backbone = get_adapter(method).apply(self.backbone, FinetuneConfig(method=method, rank=4))
        self.objective = SimCLR(self.backbone.num_features, ObjectiveConfig(proj_dim=16))

    def forward(self, batch):
        return self.objective(self.backbone, batch)


def global_batches(steps: int = STEPS, n: int = 8) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [{k: torch.randn(n, 3, 32, 32, generator=gen) for k in ("view1", "view2")} for _ in range(steps)]


def local_part(batch: dict, rank: int, world: int) -> dict:
    return {k: v.chunk(world)[rank] for k, v in batch.items()}


def train_steps(model, batches, rank, world) -> list[float]:
    """SGD steps (deterministic, no optimizer state to compare); returns the global loss per step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for batch in batches:
        loss, _ = model(local_part(batch, rank, world))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reduced = loss.detach().clone()
        if world > 1:
            dist.all_reduce(reduced)
        losses.append(reduced.item() / world)
    return losses


def _nt_xent_worker(rank, world, out):
    gen = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    local1 = z1.chunk(world)[rank].clone().requires_grad_()
    loss = nt_xent(local1, z2.chunk(world)[rank], temperature=0.5)
    loss.backward()
    reduced = loss.detach().clone()
    dist.all_reduce(reduced)
    torch.save({"loss": reduced / world, "grad": local1.grad}, Path(out) / f"rank{rank}.pt")


def test_distributed_nt_xent_equals_single_process(tmp_path):
    spawn(_nt_xent_worker, WORLD, str(tmp_path))
    gen = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    z1.requires_grad_()
    single = nt_xent(z1, z2, temperature=0.5)
    single.backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert parts[0]["loss"].item() == pytest.approx(single.item(), rel=1e-5)
    # The gradient of each rank's rows, scaled as DDP averages them, is the single-process gradient.
    grads = torch.cat([p["grad"] for p in parts]) / WORLD
    torch.testing.assert_close(grads, z1.grad, rtol=1e-4, atol=1e-6)


def _strategy_worker(rank, world, strategy, out, method=None):
    model = Module(method)
    if strategy == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        apply_fsdp(model, TrainConfig(strategy="fsdp"), torch.device("cpu"))
    losses = train_steps(model, global_batches(), rank, world)
    state = full_model_state(model)
    if rank == 0:
        torch.save({"losses": losses, "state": state}, Path(out) / f"{strategy}.pt")


@pytest.mark.parametrize("method", ["lora", "svfit"])
def test_fsdp_with_a_frozen_backbone_matches_single_process(method, tmp_path):
    """FSDP2 shards blocks that mix frozen base weights and trained adapter weights."""
    single = Module(method)
    frozen = {k: v.clone() for k, v in single.state_dict().items()}
    single_losses = train_steps(single, global_batches(), 0, 1)
    spawn(_strategy_worker, WORLD, "fsdp", str(tmp_path), method)
    result = torch.load(tmp_path / "fsdp.pt")
    assert result["losses"] == pytest.approx(single_losses, rel=1e-4)
    moved = 0
    for key, value in single.state_dict().items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        moved += not torch.equal(value, frozen[key])
    trainable = sum(p.requires_grad for p in single.parameters())
    assert 0 < moved <= trainable  # the adapter and head trained, the frozen weights did not


def test_fsdp_and_ddp_match_single_process(tmp_path):
    single = Module()
    single_losses = train_steps(single, global_batches(), 0, 1)
    for strategy in ("ddp", "fsdp"):
        spawn(_strategy_worker, WORLD, strategy, str(tmp_path))
        result = torch.load(tmp_path / f"{strategy}.pt")
        assert result["losses"] == pytest.approx(single_losses, rel=1e-4), strategy
        for key, value in single.state_dict().items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert single_losses[-1] < single_losses[0]  # and it learns


def _checkpoint_worker(rank, world, phase, folder, out):
    model = Module()
    apply_fsdp(model, TrainConfig(strategy="fsdp"), torch.device("cpu"))
    # SGD with momentum: optimizer state to checkpoint, and updates linear in the gradient.
    # (Adam divides by the gradient's size: the attention key bias, whose true gradient is
    # zero, would amplify rounding noise into differences.)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = global_batches(steps=4)
    step = 0
    if phase == "resume":
        step = load_checkpoint(Path(folder), model, optimizer)["step"]
    losses = []
    for batch in batches[step:]:
        loss, _ = model(local_part(batch, rank, world))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        losses.append(loss.item())
        if phase == "save" and step == 2:
            save_checkpoint(Path(folder) / f"rank{rank}", model, optimizer, {"step": step}, rank)
            break
    state = full_model_state(model)
    if rank == 0:
        torch.save({"state": state, "losses": losses}, Path(out) / f"{phase}-{world}.pt")


@pytest.mark.long  # 40 s on 2 cores: make test-long (the 20-minute budget of make test)
def test_sharded_checkpoint_resumes_on_another_world_size(tmp_path):
    """Save at step 2 on 2 ranks (one shard file each), resume on 1 rank: same as uninterrupted."""
    spawn(_checkpoint_worker, WORLD, "full", str(tmp_path), str(tmp_path))
    spawn(_checkpoint_worker, WORLD, "save", str(tmp_path), str(tmp_path))
    # Ray Train gathers every rank's checkpoint folder into one: do the same here.
    merged = tmp_path / "merged"
    for rank in range(WORLD):
        for path in (tmp_path / f"rank{rank}").rglob("*"):
            if path.is_file():
                target = merged / path.relative_to(tmp_path / f"rank{rank}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    assert len(list((merged / "state").glob("*.distcp"))) == WORLD  # one shard per rank
    spawn(_checkpoint_worker, 1, "resume", str(merged), str(tmp_path))
    full = torch.load(tmp_path / f"full-{WORLD}.pt")["state"]
    resumed = torch.load(tmp_path / "resume-1.pt")["state"]
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(
    "name,kwargs,blocks",
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 2),
        ("test_resnet", {}, 4),
        ("convnext_atto", {}, 4),
    ],
)
def test_fsdp_finds_the_residual_blocks(name, kwargs, blocks):
    assert len(residual_blocks(timm.create_model(name, num_classes=0, **kwargs))) == blocks


def test_fsdp_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="train.strategy"):
        residual_blocks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()))


def _bf16_fsdp_worker(rank, world, out):
    from system.config import build_config
    from system.train import evaluate
    from system.train.module import build_model

    tree = {"model": {"name": "test_resnet"}, "finetune": {"method": "full"}, "train": {"strategy": "fsdp"}}
    cfg = build_config(tree)
    torch.manual_seed(0)
    reference = build_model(cfg, "finetune", 3)
    torch.manual_seed(0)
    module = apply_fsdp(build_model(cfg, "finetune", 3), cfg.train, torch.device("cpu"), bf16=True)
    gen = torch.Generator().manual_seed(2)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=gen), "label": torch.arange(8) % 3}
    loss, _ = module(batch)
    loss.backward()
    expected, _ = reference(batch)
    metrics = evaluate(module, [batch, batch], "finetune", bf16=True)
    torch.save({"loss": loss.item(), "expected": expected.item(), **metrics}, Path(out) / "result.pt")


def test_fsdp_bf16_trains_and_evaluates(tmp_path):
    """FSDP2 as on a GPU (bf16 parameters, fp32 batch norms), run on CPU: a training step and
    the validation pass (whose fp32 images meet bf16 weights) work and match fp32."""
    spawn(_bf16_fsdp_worker, 1, str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    assert result["loss"] == pytest.approx(result["expected"], rel=0.02)
    assert 0 <= result["val_acc"] <= 1 and result["rankme"] > 1
    assert len(result["confusion"]) == 3
