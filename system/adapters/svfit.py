"""SVFit: train only the top-r singular values of each target weight (plus the head).

Our own implementation (peft has no such method). For a target weight W (a Conv2d's
reshaped to out x in*k*k), W = U S Vᵀ; the top-r triplets are kept, U_r and V_r frozen,
and the r singular values train. r is `finetune.rank` (or rank_pattern) when
`finetune.energy` is none, else the fewest singular values holding that share of
sum(S²); either times `finetune.rank_scale`. The weight is a torch parametrization

    W(s) = W₀ + U_r diag(s - s₀) V_rᵀ,   s initialised to s₀ = S_r,

so the frozen original W₀ (= residual + U_r S_r V_rᵀ) is never copied, the initial
function is exactly the base model's, and merging is removing the parametrization.
The adapter is the trained s (and s₀, to check the base on load) in safetensors + json:
U_r, V_r are recomputed from the base weights on load (a sign flip of a singular pair
leaves U diag(s - s₀) Vᵀ unchanged).

`finetune.train_norms` also trains the normalisation layers' affine weights, as the `norm`
method does (a few thousand more parameters). The adapter then carries them too. Why: on
its own svfit can only rescale directions each weight already has, and in
benchmarks/RESULTS.md it stayed 1.7-3.4 points behind LoRA r=8; the norms' per-channel
shifts and scales are the cheapest thing that adds what it lacks.

    python -c "import timm; from system.adapters.registry import get_adapter, count_parameters; \
from system.config import FinetuneConfig; m = get_adapter('svfit').apply(timm.create_model('test_resnet', \
num_classes=0), FinetuneConfig(method='svfit')); print(count_parameters(m))"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from system.adapters.norm import load_norm_state, norm_layers, norm_state, unfreeze_norms
from system.adapters.registry import (
    ADAPTER_JSON,
    ADAPTER_WEIGHTS,
    RankOptions,
    pattern_rank,
    register_adapter,
    scaled,
    target_modules,
)
from system.options import EXCLUSIVE

NORMS_PREFIX = "norms."  # adapter keys of the normalisation layers' state (train_norms)


class SvfitOptions(RankOptions):
    energy: float | None = Field(
        0.99, gt=0, le=1, description="keep the fewest singular values holding this energy share"
    )
    # Exclusive: `norm` trains the norms alone, `full` already trains them, and the peft methods
    # would not save them, so anywhere else it would be silently ignored.
    train_norms: bool = Field(
        False,
        description="also train the normalisation layers' affine weights (as `norm` does; a few "
        "thousand parameters more)",
        json_schema_extra=EXCLUSIVE,
    )


class SingularValues(nn.Module):
    """Parametrization of a weight: only its top-r singular values train."""

    def __init__(self, weight: torch.Tensor, rank: int):
        super().__init__()
        matrix = weight.detach().reshape(weight.shape[0], -1).double()  # float64: exact s₀ on reload
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        # Not persistent: recomputed from the base weights whenever the method is applied.
        self.register_buffer("u", u[:, :rank].to(weight.dtype), persistent=False)
        self.register_buffer("vh", vh[:rank].to(weight.dtype), persistent=False)
        self.register_buffer("s0", s[:rank].to(weight.dtype), persistent=False)
        self.s = nn.Parameter(s[:rank].to(weight.dtype).clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        delta = (self.u * (self.s - self.s0)) @ self.vh
        return original + delta.reshape(original.shape).to(original.dtype)


def energy_rank(weight: torch.Tensor, energy: float) -> int:
    """The fewest singular values of `weight` (as a matrix) that hold `energy` of sum(S²)."""
    s = torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1).double())
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12).item()) + 1


def svfit_ranks(backbone: nn.Module, cfg) -> dict[str, int]:
    """{target module: r}: rank_pattern, else the energy rule (or `rank` when energy is none), scaled."""
    ranks = {}
    for name, module in target_modules(backbone, cfg.target_modules).items():
        limit = min(module.weight.shape[0], module.weight[0].numel())
        rank = pattern_rank(name, cfg)
        if rank is None:
            rank = cfg.rank if cfg.energy is None else energy_rank(module.weight, cfg.energy)
        ranks[name] = scaled(rank, cfg, limit)
    return ranks


def attach(backbone: nn.Module, ranks: dict[str, int]) -> nn.Module:
    backbone.requires_grad_(False)
    modules = dict(backbone.named_modules())
    for name, rank in ranks.items():
        module = modules[name]
        parametrize.register_parametrization(module, "weight", SingularValues(module.weight, rank))
    return backbone


def adapted_modules(backbone: nn.Module) -> dict[str, SingularValues]:
    return {
        name: module.parametrizations.weight[0]
        for name, module in backbone.named_modules()
        if parametrize.is_parametrized(module, "weight")
        and isinstance(module.parametrizations.weight[0], SingularValues)
    }


def merge_svfit(backbone):
    for name in adapted_modules(backbone):
        module = backbone.get_submodule(name)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return backbone


def trains_norms(backbone: nn.Module) -> bool:
    return any(p.requires_grad for layer in norm_layers(backbone).values() for p in layer.parameters())


def save_svfit(backbone, folder):
    adapted = adapted_modules(backbone)
    state = {}
    for name, sv in adapted.items():
        state[f"{name}.s"] = sv.s.detach().cpu().contiguous()
        state[f"{name}.s0"] = sv.s0.detach().cpu().contiguous()
    norms = trains_norms(backbone)
    if norms:
        state.update({NORMS_PREFIX + key: tensor for key, tensor in norm_state(backbone).items()})
    save_file(state, str(Path(folder) / ADAPTER_WEIGHTS))
    ranks = {name: sv.s.numel() for name, sv in adapted.items()}
    meta = {"method": "svfit", "ranks": ranks, "train_norms": norms}
    (Path(folder) / ADAPTER_JSON).write_text(json.dumps(meta, indent=1))


def load_svfit(backbone, folder):
    folder = Path(folder)
    meta = json.loads((folder / ADAPTER_JSON).read_text())
    ranks = meta["ranks"]
    names = {name for name, _ in backbone.named_modules()}
    if not set(ranks) <= names:
        raise ValueError(f"svfit adapter does not fit this model: no module {sorted(set(ranks) - names)[0]}")
    attach(backbone, ranks)
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    for name, sv in adapted_modules(backbone).items():
        if not torch.allclose(sv.s0, state[f"{name}.s0"], rtol=1e-4, atol=1e-6):
            raise ValueError(f"svfit adapter was trained on other base weights ({name} differs): {folder}")
        with torch.no_grad():
            sv.s.copy_(state[f"{name}.s"])
    if meta.get("train_norms"):
        norms = {key[len(NORMS_PREFIX) :]: t for key, t in state.items() if key.startswith(NORMS_PREFIX)}
        load_norm_state(backbone, norms, folder)
    return backbone


@register_adapter(
    "svfit", export=merge_svfit, save_adapter=save_svfit, load_adapter=load_svfit, options=SvfitOptions
)
def apply_svfit(backbone, cfg):
    backbone = attach(backbone, svfit_ranks(backbone, cfg))
    if cfg.train_norms:
        unfreeze_norms(backbone, "finetune.train_norms")
    return backbone
