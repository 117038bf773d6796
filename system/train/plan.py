"""Driver-side planning of a training run: every check and derived value before any Ray work starts.

plan_run(cfg, job)  -> {"classes", "rows", "total_steps", "run_name", "meta"}
loop_config(...)    -> what every worker's run_loop reads

.venv/bin/python -m pytest -q tests/test_cli.py tests/test_adapters.py -k plan
"""

from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from system import storage
from system.adapters.registry import get_adapter
from system.config import ConfigError, JobConfig
from system.data.dataset import DataError, check_dataset, count_rows, labels_in_first
from system.data.transforms import preprocessing_config
from system.models.artifact import check_backbone_weights, create_backbone, read_meta
from system.objectives.compatible import with_compatibility
from system.objectives.registry import get_objective, nested_dims
from system.ray_env import started_here
from system.train.parallel import residual_blocks


def absolute_uris(cfg: JobConfig) -> JobConfig:
    """Workers run in other folders (and on other nodes): every path becomes absolute."""
    cfg = cfg.model_copy(deep=True)
    keys = (("data", "train"), ("data", "val"), ("model", "init"), ("objective", "compatible_with"))
    for section, key in (*keys, ("run", "storage")):
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, storage.normalize(value))
    return cfg


def global_batch(cfg: JobConfig) -> int:
    """Rows per optimizer step: batch size x workers x gradient accumulation."""
    return cfg.train.batch_size * cfg.train.workers * cfg.train.accumulation_steps


def planned_steps(cfg: JobConfig, rows: int) -> int:
    """Optimizer steps a run takes when nothing stops it early (0: less than one step of data)."""
    steps_per_epoch = rows // global_batch(cfg)
    return (cfg.train.max_steps or steps_per_epoch * cfg.train.epochs) if steps_per_epoch else 0


def plan_run(cfg: JobConfig, job: str) -> dict:
    """Everything checked and derived on the driver before any Ray work starts."""
    if not cfg.data.train:
        raise ValueError("data.train: a training dataset is required")
    init = read_init(cfg.model.init) if cfg.model.init else None
    if job == "finetune":
        get_adapter(cfg.finetune.method)
    else:
        get_objective(cfg.objective.name)
    labelled = job == "finetune" or get_objective(cfg.objective.name).labels
    classes, rows = check_training_data(cfg, job, labelled)
    best = cfg.train.keep_best
    if best not in (None, "loss") and not cfg.data.val:
        raise ValueError(f"train.keep_best: {best} is measured on data.val; set data.val")
    if best in ("val_acc", "val_top5") and job == "pretrain" and cfg.objective.name != "supervised":
        raise ValueError(f"train.keep_best: {best} needs a classifier (finetune, or objective supervised)")
    total_steps = planned_steps(cfg, rows)
    if total_steps == 0:
        raise ValueError(
            f"train.batch_size: {global_batch(cfg)} rows per step (batch size x workers x accumulation) "
            f"is more than the {rows} rows of data"
        )
    pre = check_model(cfg, job, len(classes), init)
    run_name = cfg.run.name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {
        "timm_name": cfg.model.name,
        "timm_kwargs": cfg.model.kwargs,
        "preprocessing": pre,
        "classes": classes,
        "matryoshka_dims": cfg.objective.matryoshka_dims,
        "config": cfg.model_dump(),
        "init": cfg.model.init,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return {"classes": classes, "rows": rows, "total_steps": total_steps, "run_name": run_name, "meta": meta}


def check_training_data(cfg: JobConfig, job: str, labelled: bool) -> tuple[list[str], int]:
    """data.train and data.val exist, are Parquet datasets, and fit the job: (classes, rows)."""
    try:
        classes = check_dataset(cfg.data.train, need_label=labelled)
        rows = count_rows(cfg.data.train, cfg.data.limit)
    except storage.StorageError as err:
        raise storage.StorageError(f"data.train: {err}") from None
    except (DataError, pa.ArrowInvalid) as err:  # ArrowInvalid: not Parquet
        raise DataError(f"data.train: {err}") from None
    if labelled and cfg.data.limit and len(classes) > 1:
        kept = labels_in_first(cfg.data.train, cfg.data.limit)
        if len(kept) < len(classes):  # e.g. CIFAR-10 as shipped is sorted by class
            print(
                f"[{job}] warning: data.limit keeps the first {cfg.data.limit} rows of data.train, with "
                f"{len(kept)} of its {len(classes)} classes; accuracy will mean little (sorted by class?)",
                file=sys.stderr,
                flush=True,
            )
    if cfg.data.balance and len(classes) < 2:
        raise ValueError(f"data.balance: class-balanced sampling needs labelled data ({cfg.data.train})")
    if cfg.data.balance and job == "finetune" and cfg.finetune.closed_form:
        raise ValueError("data.balance: the closed-form fit reads every row once; it has no sampling")
    if job == "finetune" and len(classes) < 2:
        raise ValueError(f"data.train: fine-tuning needs labelled data with class names ({cfg.data.train})")
    if cfg.data.val and not storage.exists(cfg.data.val):
        raise storage.StorageError(f"data.val: no such dataset: {cfg.data.val}")
    if cfg.data.val:
        try:
            check_dataset(cfg.data.val, need_label=labelled)
        except (DataError, pa.ArrowInvalid) as err:
            raise DataError(f"data.val: {err}") from None
    return classes, rows


def read_init(uri: str) -> tuple[str, dict]:
    """model.init's local folder and model.json (read once here, not in every worker)."""
    try:
        folder = str(storage.download_dir(uri))
        return folder, read_meta(folder)
    except (storage.StorageError, ValueError) as err:
        raise ValueError(f"model.init: {err}") from None


def check_model(cfg: JobConfig, job: str, num_classes: int, init: tuple[str, dict] | None) -> dict:
    """Build the backbone, objective and adapter once on the driver, so a mismatch of model,
    weights, objective or adapter fails here in one line, not in every worker. Returns the
    preprocessing config."""
    backbone = create_backbone(cfg.model.name, cfg.model.kwargs)  # also checks name and kwargs
    if init:
        try:
            check_backbone_weights(backbone, *init)
        except ValueError as err:
            raise ValueError(f"model.init: {err} (model.name is {cfg.model.name})") from None
    pre = preprocessing_config(backbone, cfg.data.image_size)
    if job == "pretrain":  # builds the objective once: a mismatch with model or data fails here
        objective_cls = get_objective(cfg.objective.name)
        objective_cls(backbone.num_features, cfg.objective, num_classes, backbone=backbone)
    nested_dims(cfg.objective, backbone.num_features)  # Matryoshka dims must fit the embedding
    objective_cls = get_objective(cfg.objective.name if job == "pretrain" else "supervised")
    with_compatibility(objective_cls, cfg, backbone, num_classes)  # compatible_with: the old model fits
    if cfg.train.strategy == "fsdp":
        residual_blocks(backbone)  # a model FSDP cannot shard block by block fails here
    if job == "finetune":
        get_adapter(cfg.finetune.method).apply(backbone, cfg.finetune)  # e.g. targets that match nothing
    random_frozen = not (cfg.model.init or cfg.model.pretrained)
    if job == "finetune" and random_frozen and cfg.finetune.method not in ("full", "norm", "linear"):
        # Seen in a sweep (benchmarks/RESULTS.md, lr-method-peft): lora and svfit on a random
        # test_resnet learnt exactly what a linear head learns.
        print(
            f"[finetune] warning: finetune.method {cfg.finetune.method} adapts a frozen backbone, and "
            "without model.init or model.pretrained its weights are random; timm ResNets start each "
            "block's last BatchNorm scale at 0, so adapters there get no gradient at all",
            file=sys.stderr,
            flush=True,
        )
    return pre


def check_fits_cluster(cfg: JobConfig, job: str, use_gpu: bool) -> None:
    """Workers that ask for more than the cluster has: Ray Train waits for them, forever on
    a job's own local instance (a one-line error), or until an autoscaler adds nodes. And
    workers that leave no CPU for the input pipeline (a warning)."""
    have = ray.cluster_resources()
    workers, cpus = cfg.train.workers, cfg.train.workers * cfg.train.cpus_per_worker
    short = [
        (key, f"{workers} workers need {need:g} {name}s and the cluster has {have.get(name, 0):g}", fix)
        for key, name, need, fix in (
            ("train.cpus_per_worker", "CPU", cpus, "lower it, or train.workers"),
            ("train.use_gpu", "GPU", workers if use_gpu else 0, "set it false, or unset it: GPUs if any"),
        )
        if need > have.get(name, 0)
    ]
    if short and started_here():
        key, what, fix = short[0]
        raise ConfigError(f"{key}: {what}; this job's own Ray instance cannot grow ({fix})")
    for _, what, _ in short:
        print(f"[{job}] warning: {what}; Ray Train waits until nodes are added", file=sys.stderr, flush=True)
    spare = have.get("CPU", 0) - cpus
    if spare < 0.5:  # Ray Data's decode tasks then wait forever (unless an autoscaler adds nodes)
        print(
            f"[{job}] warning: {workers} workers x {cfg.train.cpus_per_worker} CPUs leave "
            f"{max(spare, 0):g} of the cluster's CPUs for the input pipeline; lower train.cpus_per_worker",
            file=sys.stderr,
            flush=True,
        )


def uses_gpu(cfg: JobConfig) -> bool:
    """train.use_gpu, or when unset, whether the cluster has GPUs."""
    if cfg.train.use_gpu is None:
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.train.use_gpu


def loop_config(cfg: JobConfig, job: str, plan: dict, start_from=None) -> dict:
    """What `run_loop` reads: the config, the driver's plan, and a checkpoint to start from."""
    return {
        "cfg": cfg.model_dump(),
        "job": job,
        "classes": plan["classes"],
        "total_steps": plan["total_steps"],
        "meta": plan["meta"],
        "has_val": bool(cfg.data.val),
        "fail_at_step": int(os.environ.get("REPFORGE_FAIL_AT_STEP", 0)) or None,
        "fault_marker": os.environ.get("REPFORGE_FAULT_MARKER"),
        "start_from": start_from,
    }


def has_checkpoints(train_run: str) -> bool:
    """Whether Ray Train has checkpoints of this run (its folder under train_storage)."""
    fs, path = storage.filesystem(train_run)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return any(e.base_name.startswith("checkpoint_") for e in entries)


def train_storage(storage_root: str) -> str:
    """Where Ray Train keeps its runs (checkpoints, state) under `run.storage`: `{storage}/_ray`."""
    return storage.join(storage.normalize(storage_root), "_ray")
