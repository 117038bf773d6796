"""Callbacks that run in the Ray Train controller, kept out of system/train.py.

The controller unpickles its callbacks, and unpickling a class imports the module that
defines it: a callback in system/train.py made every controller import torch and timm,
4-5 s per run on 2 CPUs, for a process that only passes reports along. This module (and
tune/callbacks.py for the sweep's) imports nothing heavier than Ray.
"""

from __future__ import annotations

import json
import time

from ray.train.v2.api.callback import UserCallback

from system import storage


class MetricsLogger(UserCallback):
    """Every report becomes a line of `{storage}/{run}/metrics.jsonl`."""

    def __init__(self, storage_root: str, run_name: str):
        self.uri = storage.join(storage.normalize(storage_root), run_name, "metrics.jsonl")
        self.lines: list[str] = []
        if storage.exists(self.uri):  # a resumed run continues the file
            self.lines = storage.read_text(self.uri).splitlines()

    def after_report(self, run_context, metrics, checkpoint):
        self.lines.append(json.dumps({"time": time.time(), **metrics[0]}, default=float))
        # Rewritten whole: works on object stores too.
        storage.write_text(self.uri, "\n".join(self.lines) + "\n")
