"""Fine-tuning methods, one file each, registered by name.

A method is a function `apply(backbone, cfg) -> backbone` that decides which weights
train (and may wrap the backbone, as peft does), plus `export(backbone) -> backbone`
returning a plain timm backbone with the adaptation merged in, and `save_adapter(backbone,
folder)` writing the small adapter-only artifact. Adding one: a new file with
`@register_adapter("name")`, one import line below, one row in tests/test_adapters.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ADAPTERS: dict[str, AdapterMethod] = {}


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    apply: Callable
    export: Callable
    save_adapter: Callable | None = None


def register_adapter(name: str, export: Callable, save_adapter: Callable | None = None):
    def add(apply):
        if name in ADAPTERS:
            raise ValueError(f"adapter method {name!r} registered twice")
        ADAPTERS[name] = AdapterMethod(name, apply, export, save_adapter)
        return apply

    return add


def get_adapter(name: str) -> AdapterMethod:
    if name not in ADAPTERS:
        raise ValueError(f"finetune.method: unknown method {name!r} (known: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[name]


def count_parameters(module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


from system.adapters import full, lora  # noqa: E402,F401  (fills the registry)
