"""Training objectives, one file each, registered by name.

An objective is an nn.Module holding its own heads (projection, classifier); its
`forward(backbone, batch)` returns the scalar loss for the local batch and a dict of
extra metrics. Adding one: a new file with `@register_objective("name")`, one import
line below, one row in tests/test_objectives.py.
"""

from __future__ import annotations

OBJECTIVES: dict[str, type] = {}


def register_objective(name: str):
    def add(cls):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        OBJECTIVES[name] = cls
        cls.name = name
        return cls

    return add


def get_objective(name: str) -> type:
    if name not in OBJECTIVES:
        raise ValueError(
            f"objective.name: unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})"
        )
    return OBJECTIVES[name]


from system.objectives import simclr, supervised  # noqa: E402,F401  (fills the registry)
