"""`full`: every backbone weight trains; `linear`: the backbone is frozen, only the head trains.

A `linear` adapter is the head alone (train.py writes head.pt next to the json marker);
`full` has no adapter: its artifact is the whole model.

    .venv/bin/python -m pytest -q tests/test_adapters.py -k "full or linear"
"""

from __future__ import annotations

import json
from pathlib import Path

from system.adapters.registry import ADAPTER_JSON, register_adapter


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


@register_adapter("linear", export=_identity, save_adapter=_save_linear, load_adapter=_load_linear)
def apply_linear(backbone, cfg):
    backbone.requires_grad_(False)
    return backbone
