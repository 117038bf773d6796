"""`full`: every backbone weight trains; `linear`: the backbone is frozen, only the head trains.

A `linear` adapter is the head alone (train.py writes head.pt next to the json marker);
`full` has no adapter: its artifact is the whole model.

    .venv/bin/python -m pytest -q tests/test_adapters.py -k "full or linear"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator

from system.adapters.registry import ADAPTER_JSON, register_adapter
from system.options import EXCLUSIVE, Options


class LinearOptions(Options):
    # Exclusive: only a frozen backbone gives fixed features; every other method trains it too.
    closed_form: bool = Field(
        False,
        description="fit the head in closed form (ridge regression on frozen features, one pass "
        "over the data) instead of by SGD",
        json_schema_extra=EXCLUSIVE,
    )
    ridge: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        min_length=1,
        description="closed_form: ridge strengths (x n x mean feature variance) tried; the best on data.val "
        "wins, without data.val the middle one",
    )

    @field_validator("ridge", mode="before")
    @classmethod
    def _one_ridge_is_a_list(cls, value):
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _identity(backbone):
    return backbone


def _save_linear(backbone, folder):
    (Path(folder) / ADAPTER_JSON).write_text(json.dumps({"method": "linear"}))


def _load_linear(backbone, folder):
    return backbone.requires_grad_(False)


@register_adapter("full", export=_identity)
def apply_full(backbone, cfg):
    backbone.requires_grad_(True)
    return backbone


@register_adapter(
    "linear", export=_identity, save_adapter=_save_linear, load_adapter=_load_linear, options=LinearOptions
)
def apply_linear(backbone, cfg):
    backbone.requires_grad_(False)
    return backbone
