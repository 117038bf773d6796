"""Adapters stage: fine-tuning methods, one file each, registered by name (registry.py).

Adding a method: a new file here with `@register_adapter("name", ..., options=...)` (its
options, a system.options.Options model, become `finetune.*` keys), its name in the import
line below, one row in tests/test_adapters.py (METHODS and its parameter formula). Members
import registry.py (and peft_common.py), never this package face.
"""

from system.adapters import dora, full, ia3, loha, lora, norm, pissa, svfit  # noqa: F401  (fill the registry)
from system.adapters.registry import (
    ADAPTERS,
    adapter_bytes,
    count_parameters,
    get_adapter,
    load_adapter,
    parameter_report,
    target_modules,
)

__all__ = [
    "ADAPTERS",
    "adapter_bytes",
    "count_parameters",
    "get_adapter",
    "load_adapter",
    "parameter_report",
    "target_modules",
]
