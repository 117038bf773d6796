"""Callbacks that a sweep trial hands to its Train run; they run in the Train controller.

Kept apart from tune/sweep.py, which imports system/train.py and with it torch and timm:
the controller imports the module of every callback it unpickles (see
system/train_callbacks.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2.api.callback import UserCallback


class ReportToTune(UserCallback):
    """Passes every report, and with `staging` a copy of its checkpoint, to the trial
    through the `reports` queue (TuneReportCallback passes only the checkpoint's path, and
    PBT needs Tune checkpoints to clone). The copy is made here, before Train goes on:
    Train may delete that checkpoint at its next report (train.keep_last / keep_best)."""

    def __init__(self, reports, staging: str):
        self.reports, self.staging = reports, staging

    def after_report(self, run_context, metrics, checkpoint):
        metrics, local = dict(metrics[0]), None
        if checkpoint is not None:
            metrics["checkpoint_path"] = checkpoint.path  # the Train checkpoint: publish_result reads it
            # On the trial's node: Ray Train places the controller there.
            os.makedirs(self.staging, exist_ok=True)
            local = checkpoint.to_directory(tempfile.mkdtemp(dir=self.staging))
        self.reports.put((metrics, local))  # waits while the trial has not taken the last one


class ControllerHandoff(ControllerCallback):
    """Leaves the controller's actor handle in a file, where its trial finds it to abort the
    Train run when Tune stops the trial (tune/sweep.py, _abort_train_run)."""

    def __init__(self, path: str):
        self.path = path

    def after_controller_start(self, train_run_context) -> None:
        Path(self.path).write_bytes(ray.cloudpickle.dumps(ray.get_runtime_context().current_actor))
