"""A sweep trial that trains in its own Tune process (`sweep.in_process: true`).

A trial normally fits a TorchTrainer: Ray Train starts a controller actor, then a worker
group in a new process that imports torch and timm, and polls the workers for their
reports. On 2 CPUs that is about 12 s per trial before the first step, which for a sweep
of short trials, most of them stopped at their first rung, is most of what a stopped trial
costs (benchmarks/bench_sweep.py). In-process, the trial's own process, reused from trial to
trial with torch and timm already imported, runs the same training loop
(`system.train.loop.run_loop`) as the only worker: the whole datasets, the trial's device, and
reports that go straight to Tune, checkpoints included (Tune keeps them in `_tune/`).

Ray Train has a local mode of its own (`ScalingConfig(num_workers=0)`: the loop runs in the
calling process), but inside a Tune trial Ray refuses `ray.train.get_context` and
`ray.train.report`, and local mode passes no report on: hence this small runtime.
"""

from __future__ import annotations

import threading

import ray
import torch
from ray import tune

from system.config import JobConfig
from system.train import input_datasets, loop_config, run_loop, uses_gpu
from system.train.callbacks import MetricsLogger

# Set when Tune stops this process's trial or hands the process to the next trial: the loop
# returns at its next step, so the process is free at once (tune/sweep.py, SweepTrial).
STOP = threading.Event()


class InProcessTrial:
    """What `run_loop` needs, from a Tune trial: the `TrainWorker` interface of system/train.py."""

    rank, world = 0, 1

    def __init__(self, datasets: dict, device: torch.device, logger: MetricsLogger):
        self.datasets, self.device, self.logger = datasets, device, logger

    def checkpoint(self):
        return None  # a trial that Tune restores gets its checkpoint as `start_from`

    def shard(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, folder: str | None = None) -> None:
        self.logger.after_report(None, [metrics], None)  # trials/{id}/metrics.jsonl
        checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
        tune.report(metrics, checkpoint=checkpoint)  # Tune copies the folder before it returns

    def stop_requested(self) -> bool:
        return STOP.is_set()


def stop_trial() -> None:
    """Tune stops this process's trial: its loop returns at the next step (if one is running)."""
    STOP.set()


def train_in_process(cfg: JobConfig, job: str, plan: dict, start_from, logger: MetricsLogger) -> None:
    """Run the training loop of `cfg` in this process, reporting to Tune."""
    STOP.clear()
    # Tune has set CUDA_VISIBLE_DEVICES to the trial's GPU.
    device = torch.device("cuda", 0) if uses_gpu(cfg) else torch.device("cpu")
    # What the DataConfig of a Train run asks for: blocks in order, the same batches every run.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    datasets = input_datasets(cfg, job, plan["meta"]["preprocessing"])
    run_loop(loop_config(cfg, job, plan, start_from), InProcessTrial(datasets, device, logger))


def trial_resources(cfg: JobConfig) -> dict:
    """The trial's process trains: it asks for the one worker's CPUs (and GPU)."""
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if uses_gpu(cfg) else {})}
