"""Compat stage: upgrade the model without re-indexing first (docs/upgrades.md).

maps.py    maps from a new model's space into an old one's (procrustes, affine, low-rank, mlp)
fit.py     `repforge compat fit`: embed a sample with both models, fit and pick a map, the adapter artifact
check.py   `repforge compat check`: the gate's report (old/old, new/old, new/new top-1 and mAP@k)
gate.py    serving_gate: whether serving may answer a model's queries from another model's index
Compatible training itself is the objective wrapper in system/objectives/compatible.py.
"""

from system.compat.check import build_report, pair_scores, run_check
from system.compat.fit import Adapter, CompatError, fit_adapter, load_adapter, run_fit, save_adapter
from system.compat.gate import Gate, read_report, serving_gate
from system.compat.maps import KINDS, apply_map, choose_map, fit_map

__all__ = [
    "KINDS",
    "Adapter",
    "CompatError",
    "Gate",
    "apply_map",
    "build_report",
    "choose_map",
    "fit_adapter",
    "fit_map",
    "load_adapter",
    "pair_scores",
    "read_report",
    "run_check",
    "run_fit",
    "save_adapter",
    "serving_gate",
]
