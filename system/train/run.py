"""Pretraining and fine-tuning under Ray Train (TorchTrainer, DDP over gloo or NCCL, or FSDP2).

    repforge pretrain --config configs/quickstart.yaml
    repforge finetune --config configs/quickstart.yaml --set model.init=runs/qs/pretrain/model

The driver plans and checks the run (plan.py), builds the Ray Data input pipeline
(inputs.py) and launches one TorchTrainer; `train_loop_per_worker` runs the loop
(loop.py) on every worker; the final checkpoint holds the finished artifacts, which the
driver publishes under `{run.storage}/{run.name}/` (export.py).
"""

from __future__ import annotations

import os

import ray
import ray.train
import ray.train.torch

from system import storage
from system.config import JobConfig, check_gpu_options
from system.ray_env import ensure_ray, omp_env
from system.train import run_record
from system.train.callbacks import MetricsLogger
from system.train.export import publish_result
from system.train.inputs import input_datasets
from system.train.linear_probe import run_linear_probe
from system.train.loop import run_loop
from system.train.plan import (
    absolute_uris,
    check_fits_cluster,
    has_checkpoints,
    loop_config,
    plan_run,
    train_storage,
    uses_gpu,
)


class TrainWorker:
    """What `run_loop` takes from the process it runs in, here a Ray Train worker: its rank,
    device, dataset shards and restart checkpoint, and where its reports go. (A sweep's
    in-process trials give it the same from a Tune trial instead: tune/in_process.py.)"""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self):
        """This run's own latest checkpoint (a restart after a worker failure, a resumed run)."""
        return ray.train.get_checkpoint()

    def shard(self, name: str):
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, folder: str | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def stop_requested(self) -> bool:
        return False  # Ray Train stops its workers itself


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    run_loop(config, TrainWorker())


def build_trainer(cfg: JobConfig, job: str, plan: dict, callbacks=(), start_from=None):
    """One TorchTrainer for this job (also what each sweep trial builds).

    `start_from`: a checkpoint (of any run of this job and model) that a new run starts from:
    weights, optimizer state and position, with this config's hyperparameters. (Train v2 has
    no `resume_from_checkpoint`; a run's own checkpoints still come first, on restarts.)
    """
    from ray.train.torch import TorchTrainer

    use_gpu = uses_gpu(cfg)
    check_gpu_options(cfg.train, use_gpu)  # train.compile / gpu_decode on CPU workers: one line
    check_fits_cluster(cfg, job, use_gpu)
    datasets = input_datasets(cfg, job, plan["meta"]["preprocessing"])
    # The controller polls its workers every 2 s by default, so each report, and the end of
    # the run, reached us up to 2 s late; at 0.5 s a sweep trial ended 2-3 s sooner. The
    # controller reads it from the environment of the process that calls fit(): this one.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, job, plan, start_from),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=plan["run_name"],
            storage_path=train_storage(cfg.run.storage),
            callbacks=list(callbacks),
            checkpoint_config=checkpoint_policy(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=datasets,
        # Blocks reach the workers in order, so each worker's share is the same in every run.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"], execution_options=ray.data.ExecutionOptions(preserve_order=True)
        ),
    )


def checkpoint_policy(cfg: JobConfig) -> ray.train.CheckpointConfig:
    """keep_last newest checkpoints, or keep_last best by `train.keep_best` (Ray Train keeps
    the newest as well, so a restart resumes where the run stopped)."""
    best = cfg.train.keep_best
    return ray.train.CheckpointConfig(
        num_to_keep=cfg.train.keep_last,
        checkpoint_score_attribute=best,
        checkpoint_score_order="min" if best == "loss" else "max",
    )


def run_training(cfg: JobConfig, job: str) -> dict[str, str]:
    """Run one pretrain or finetune job to completion; returns {"model": uri, ...}."""
    cfg = absolute_uris(cfg)
    plan = plan_run(cfg, job)
    run_uri = storage.join(storage.normalize(cfg.run.storage), plan["run_name"])
    tree = {**cfg.model_dump(), "classes": plan["classes"]}
    if has_checkpoints(storage.join(train_storage(cfg.run.storage), plan["run_name"])):
        run_record.check_same(run_uri, tree, f"{job} run", keys=run_record.TRAINING_KEYS[job])
        print(f"[{job}] continuing run {plan['run_name']} from its checkpoints (a new run.name starts over)")
    run_record.record(run_uri, tree)
    ensure_ray(runtime_env=omp_env())
    if job == "finetune" and cfg.finetune.closed_form:  # one pass of Ray Data, no Ray Train
        return run_linear_probe(cfg, plan)
    trainer = build_trainer(cfg, job, plan, callbacks=[MetricsLogger(cfg.run.storage, plan["run_name"])])
    result = trainer.fit()
    published = publish_result(result, cfg, job, plan["run_name"])
    summary = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    print(f"[{job}] done: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items()), flush=True)
    return published
