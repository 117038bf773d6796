"""Fine-tuning methods, one file each, registered by name.

A method is a function `apply(backbone, cfg) -> backbone` that decides which weights
train (and may wrap the backbone, as peft does), plus `export(backbone) -> backbone`
returning a plain timm backbone with the adaptation merged in, `save_adapter(backbone,
folder)` writing the small adapter-only artifact, and `load_adapter(backbone, folder) ->
backbone` putting a saved adapter back onto the plain base backbone it was trained from.
Its options (a system.options.Options model, which config.py makes `finetune.<option>` keys)
are passed to the decorator too; the options several methods read are declared here, beside
the helpers that read them (TargetOptions, RankOptions), and in peft_common.py (LoraOptions).
Adding one: a new file with `@register_adapter("name", ..., options=...)`, its name in the
import line of system/adapters/__init__.py, one row in tests/test_adapters.py.

    python -c "from system.adapters.registry import ADAPTERS; print(sorted(ADAPTERS))"
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator
from torch import nn

from system.options import Options

ADAPTERS: dict[str, AdapterMethod] = {}

# Default targets per family: a ViT's attention and MLP linears, a CNN's convolutions.
VIT_TARGETS = r".*\.(qkv|proj|fc1|fc2)$"
CONV_TARGETS = r".*\.conv\d+$"
# Written next to our own (non-peft) adapters: which method, and what it needs to load.
ADAPTER_JSON = "repforge_adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    apply: Callable
    export: Callable
    save_adapter: Callable | None = None
    load_adapter: Callable | None = None
    options: type | None = None


def register_adapter(
    name: str,
    export: Callable,
    save_adapter: Callable | None = None,
    load_adapter: Callable | None = None,
    options: type | None = None,
):
    def add(apply):
        if name in ADAPTERS:
            raise ValueError(f"adapter method {name!r} registered twice")
        ADAPTERS[name] = AdapterMethod(name, apply, export, save_adapter, load_adapter, options)
        return apply

    return add


def _regex(pattern: str | None) -> str | None:
    """`pattern` when it is a valid regular expression; else one line naming the fault."""
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({err})") from None
    return pattern


class TargetOptions(Options):
    """Which layers a method adapts (read by target_modules)."""

    target_modules: str | None = Field(
        None, description="regex of module names to adapt; none = the model family's default"
    )

    @field_validator("target_modules")
    @classmethod
    def _target_modules_compiles(cls, value):
        return _regex(value)


class RankOptions(TargetOptions):
    """The rank of each adapted layer (read by pattern_rank and scaled)."""

    rank: int = Field(8, ge=1, le=1024, description="adapter rank (svfit: when energy is none)")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="per-module ranks by module-name regex, overriding `rank`"
    )
    rank_scale: float = Field(
        1.0,
        gt=0,
        le=64,
        description="global rank budget: multiplies every rank (rank, rank_pattern, svfit's energy ranks)",
    )

    @field_validator("rank_pattern")
    @classmethod
    def _rank_pattern_compiles(cls, value):
        for pattern in value:
            _regex(pattern)
        return value


def get_adapter(name: str) -> AdapterMethod:
    if name not in ADAPTERS:
        raise ValueError(f"finetune.method: unknown method {name!r} (known: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[name]


def count_parameters(module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def default_targets(backbone: nn.Module) -> str:
    names = [name for name, _ in backbone.named_modules()]
    return VIT_TARGETS if any(re.fullmatch(VIT_TARGETS, n) for n in names) else CONV_TARGETS


def target_modules(backbone: nn.Module, regex: str | None) -> dict[str, nn.Module]:
    """{name: module} of the Linear/Conv2d layers that `regex` (or the family default) names."""
    regex = regex or default_targets(backbone)
    found = {
        name: module
        for name, module in backbone.named_modules()
        if re.fullmatch(regex, name) and isinstance(module, (nn.Linear, nn.Conv2d))
    }
    if not found:
        raise ValueError(f"finetune.target_modules: {regex!r} matches no Linear or Conv2d layer of the model")
    return found


def pattern_rank(name: str, cfg) -> int | None:
    """The rank `finetune.rank_pattern` gives module `name` (peft's matching rule), else None."""
    for pattern, rank in cfg.rank_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return rank
    return None


def scaled(rank: int, cfg, limit: int | None = None) -> int:
    """`rank` times the global budget multiplier `finetune.rank_scale`, at least 1, at most `limit`."""
    out = max(1, round(rank * cfg.rank_scale))
    return min(out, limit) if limit else out


def adapter_bytes(folder: str | Path) -> int:
    """Bytes of an adapter artifact folder (what a run reports as `adapter_bytes`)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def parameter_report(module: nn.Module) -> dict:
    """Metrics every fine-tune reports: trainable and total parameters, and the trainable share."""
    trainable, total = count_parameters(module)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / max(1, total),
    }


def load_adapter(backbone: nn.Module, folder: str | Path) -> nn.Module:
    """Put the adapter saved in `folder` back onto `backbone` (the same base weights), any method."""
    import json

    folder = Path(folder)
    if (folder / ADAPTER_JSON).is_file():
        method = json.loads((folder / ADAPTER_JSON).read_text())["method"]
    elif (folder / "adapter_config.json").is_file():
        method = "lora"  # peft's loader, for every peft method: it reads the type from the config
    else:
        raise ValueError(f"not an adapter folder (no {ADAPTER_JSON} or adapter_config.json): {folder}")
    loader = get_adapter(method).load_adapter
    if loader is None:
        raise ValueError(f"finetune.method: {method} saves no adapter to load")
    return loader(backbone, folder)
