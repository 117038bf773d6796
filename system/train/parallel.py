"""Data parallelism for a training module: DDP, or FSDP2 (`fully_shard`) applied in a fixed order.

    module = parallelize(module, train_cfg, device)   # inside a Ray Train worker

FSDP2 follows torchtitan's parallelize functions: activation checkpointing, then
torch.compile, then `fully_shard` on every residual block / stage, then on the root, so
each block's parameters are all-gathered just before it runs and freed after. Works for
timm ViTs (`blocks`), ConvNeXts (`stages`) and ResNets (`layer1..4`), with or without a
peft wrapper around the backbone. On GPU the parameters compute in bf16 (batch norms in
fp32) and gradients reduce in fp32; on CPU (gloo) everything stays fp32.

    .venv/bin/python -m pytest -q tests/test_parallel.py -k fsdp
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from torch import nn


def residual_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: ViT blocks, ConvNeXt stages, ResNet layers."""
    for name, module in backbone.named_modules():
        is_list = isinstance(module, nn.Sequential | nn.ModuleList)
        if name.rsplit(".", 1)[-1] in ("blocks", "stages") and is_list:
            return list(module)
    layers = [m for name, m in backbone.named_modules() if re.fullmatch(r"(.*\.)?layer\d+", name)]
    if layers:
        return layers
    raise ValueError(
        "train.strategy: fsdp needs a model with blocks, stages or layerN modules "
        f"({type(backbone).__name__} has none)"
    )


def timm_model(backbone: nn.Module) -> nn.Module:
    """The timm model inside a peft wrapper (or the backbone itself)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def apply_fsdp(module: nn.Module, train_cfg, device: torch.device, bf16: bool | None = None) -> nn.Module:
    """Shard `module` (backbone + objective heads) over all ranks with FSDP2.

    `bf16`: bf16 parameters in compute (default: on CUDA); tests set it on CPU to run the
    GPU's dtype path there.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    bf16 = device.type == "cuda" if bf16 is None else bf16
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    backbone = module.backbone
    if train_cfg.activation_checkpointing:
        timm_model(backbone).set_grad_checkpointing(True)  # timm recomputes each block in backward
    blocks = residual_blocks(backbone)
    compile_blocks(module, train_cfg, device)
    # One rank holds every parameter whole anyway: re-gathering (re-casting to bf16) each block
    # for the backward would only cost time there. Across ranks, resharding saves the memory.
    options = {"mesh": mesh, "reshard_after_forward": dist.get_world_size() > 1}
    if train_cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # Batch norms keep fp32 weights (their running stats are fp32 buffers, which bf16
        # weights clash with in backward): each is its own FSDP group with an fp32 policy
        # that leaves its bf16 input as it is, the same mix autocast gives under DDP.
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, cast_forward_inputs=False)
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.weight is not None:
                fully_shard(layer, **{**options, "mp_policy": fp32})
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(module, **options)
    return module


def compile_blocks(module: nn.Module, train_cfg, device: torch.device) -> None:
    """train.compile (unset: on CUDA): torch.compile each residual block in place, so parameter
    names (and checkpoints) stay the same; the whole backbone when it has no such blocks."""
    wanted = device.type == "cuda" if train_cfg.compile is None else train_cfg.compile
    if not wanted or device.type != "cuda":  # a CPU run with it set is refused at plan time
        return
    try:
        blocks = residual_blocks(module.backbone)
    except ValueError:
        blocks = [module.backbone]
    for block in blocks:
        block.compile()


def parallelize(module: nn.Module, train_cfg, device: torch.device) -> nn.Module:
    """DDP through Ray Train (`prepare_model`), or FSDP2; a single process runs unwrapped
    (outside Ray Train too: a sweep's in-process trial has no process group)."""
    import ray.train.torch

    if not dist.is_initialized():
        return module.to(device)
    if train_cfg.strategy == "fsdp":
        return apply_fsdp(module.to(device), train_cfg, device)
    compile_blocks(module, train_cfg, device)
    return ray.train.torch.prepare_model(module)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (FSDP2 modifies the module in place, so it is its own)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-batches (DDP no_sync / FSDP2 flag)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
