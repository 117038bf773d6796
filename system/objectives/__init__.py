"""Objectives stage: training objectives, one file each, registered by name (registry.py).

Adding one: a new file here holding its options (a system.options.Options model) and
`@register_objective("name", options=..., views=..., labels=...)`, its name in the import
line below, one row in tests/test_objectives.py (ROWS). Its options become `objective.*`
keys (system/config.py composes them; --help lists them). Members import registry.py,
never this package face.
"""

from system.objectives import mae, rotation, simclr, supervised  # noqa: F401  (fill the registry)
from system.objectives.registry import OBJECTIVES, get_objective, nested_dims

__all__ = ["OBJECTIVES", "get_objective", "nested_dims"]
