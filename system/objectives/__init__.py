"""Objectives stage: training objectives, one file each, registered by name (registry.py).

Adding one: a new file here with `@register_objective("name")`, its name in the import
line below, one row in tests/test_objectives.py. Members import registry.py, never this
package face.
"""

from system.objectives import mae, rotation, simclr, supervised  # noqa: F401  (fill the registry)
from system.objectives.registry import OBJECTIVES, get_objective, nested_dims

__all__ = ["OBJECTIVES", "get_objective", "nested_dims"]
