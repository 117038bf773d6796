"""Pretraining and fine-tuning under Ray Train (TorchTrainer, DDP over gloo or NCCL).

    repforge pretrain --config configs/quickstart.yaml
    repforge finetune --config configs/quickstart.yaml --set model.init=runs/qs/pretrain/model

The driver validates the config, builds the Ray Data input pipeline and launches one
TorchTrainer; `train_loop_per_worker` runs on every worker; the final checkpoint holds
the finished artifacts (model, and for fine-tuning the adapter), which the driver
publishes under `{run.storage}/{run.name}/`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from system import run_record, storage
from system.adapters import adapter_bytes, get_adapter, parameter_report
from system.checkpoint import full_model_state, load_checkpoint, save_checkpoint
from system.config import ConfigError, JobConfig
from system.data import (
    DataError,
    balance_rows,
    check_dataset,
    class_repeats,
    count_rows,
    labels_in_first,
    read_dataset,
    read_table,
    training_columns,
)
from system.metrics import knn_accuracy, rankme, uniformity
from system.models import Embedder, check_backbone_weights, create_backbone, read_meta, write_artifact
from system.objectives import get_objective, nested_dims
from system.optim import build_optimizer, cosine_with_warmup
from system.parallel import gradient_sync, parallelize, residual_blocks, unwrap
from system.ray_env import ensure_ray, omp_env, started_here
from system.runs import write_confusion_png
from system.train_callbacks import MetricsLogger
from system.train_module import TrainModule, build_model, train_mode
from system.transforms import preprocess_batch, preprocessing_config


@torch.no_grad()
def evaluate(module: TrainModule, batches, job: str, bf16: bool) -> dict:
    """Validation metrics on the full val set: kNN top-1, RankMe, uniformity; accuracy for fine-tunes.

    `batches`: the val set's batches (dicts of tensors on the module's device). Under FSDP
    every rank runs it in lockstep (the forward all-gathers parameters) and the root's own
    parameters are gathered explicitly, since the heads run outside its forward. `bf16`
    runs it under bf16 autocast, as on GPUs: needed there under FSDP2, whose gathered
    parameters are bf16 while the input images are fp32.
    """
    module.eval()
    sharded = hasattr(module, "unshard")
    if sharded:
        module.unshard()
    features, labels, correct, correct5, confusion = [], [], 0, 0, None
    for batch in batches:
        with torch.autocast(batch["image"].device.type, torch.bfloat16, enabled=bf16):
            embedding = module.backbone(batch["image"])
            logits = module.objective.head(embedding) if job == "finetune" else None
        if job == "finetune":
            target = batch["label"].long()
            correct += (logits.argmax(-1) == target).sum().item()
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct5 += (top5 == target[:, None]).any(-1).sum().item()
            pairs = target * logits.shape[-1] + logits.argmax(-1)  # (true, predicted) as one index
            counts = torch.bincount(pairs.cpu(), minlength=logits.shape[-1] ** 2)
            confusion = counts if confusion is None else confusion + counts
        features.append(nn.functional.normalize(embedding.float(), dim=-1).cpu())
        if "label" in batch:
            labels.append(batch["label"].cpu())
    if sharded:
        module.reshard()
    train_mode(module)
    if not features:
        return {}
    feats = torch.cat(features)
    metrics = {"rankme": rankme(feats), "val_uniformity": uniformity(feats[:2048])}
    if labels:
        labels = torch.cat(labels).long()
        metrics["knn_acc"] = knn_accuracy(feats, labels, k=20)
        if job == "finetune":
            metrics["val_acc"] = correct / len(labels)
            metrics["val_top5"] = correct5 / len(labels)
            classes = int(confusion.numel() ** 0.5)
            if classes <= MAX_CONFUSION_CLASSES:  # kept in model.json: bounded in size
                metrics["confusion"] = confusion.reshape(classes, classes).tolist()
    return metrics


MAX_CONFUSION_CLASSES = 100


def export_artifacts(folder: Path, state: dict, cfg: JobConfig, job: str, meta: dict, num_classes: int):
    """Write the finished artifacts into a checkpoint folder: model/ and, for fine-tunes, adapter/.

    `state` is the full (unsharded) state dict; it is loaded into a fresh unwrapped module,
    so DDP and FSDP runs export the same way.
    """
    module = build_model(cfg, job, num_classes)
    module.load_state_dict(state)
    backbone = module.backbone
    head = getattr(module.objective, "head", None)
    if job == "finetune":
        method = get_adapter(cfg.finetune.method)
        if method.save_adapter is not None:
            (folder / "adapter").mkdir()
            method.save_adapter(backbone, folder / "adapter")
            head_state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
            torch.save(head_state, folder / "adapter" / "head.pt")
            (folder / "adapter" / "adapter.json").write_text(json.dumps(meta, indent=2, default=str))
        backbone = method.export(backbone)
    embedder = Embedder(backbone, num_classes=head.out_features if head is not None else 0)
    if head is not None:
        embedder.head.load_state_dict(head.state_dict())
    (folder / "model").mkdir()
    write_artifact(folder / "model", embedder, meta)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Window:
    """Throughput and time split between waiting for data and computing, since the last report."""

    def __init__(self):
        self.start = self.step_end = time.perf_counter()
        self.data_wait, self.images, self.steps, self.losses = 0.0, 0, 0, []

    def metrics(self, world: int) -> dict:
        elapsed = time.perf_counter() - self.start
        return {
            "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "images_per_s": self.images * world / elapsed,
            "images_per_s_worker": self.images / elapsed,
            "step_time_s": elapsed / max(1, self.steps),
            "data_wait_share": self.data_wait / elapsed,
        }


def fault_injected(config: dict, step: int, rank: int, world: int, resumed: bool) -> bool:
    """Test hook: REPFORGE_FAIL_AT_STEP=N on the driver kills the last rank at step N, once.

    "Once": only in an attempt that did not start from a checkpoint, so the restarted run
    (which resumes from one) goes past step N.
    """
    if config.get("fail_at_step") == step and rank == world - 1 and not resumed:
        # Ray Train's controller collects reports by polling workers (every 2 s): a crash
        # right after a report loses that report and its checkpoint. Wait it out, so the
        # test knows which checkpoint the restart must resume from.
        time.sleep(5)
        return True
    return False


# A time budget times steps from step 3 (the data pipeline's start and allocator warm-up
# left out) to step 15, then again from there to a tenth of the way through the run: on
# CPUs the first steps run slower than the steady state (a 20-minute SimCLR run timed only
# at step 15 ended after about 18 minutes, benchmarks/bench_learning.py).
BUDGET_SKIP_STEPS, BUDGET_TIMED_STEPS = 3, 12


class TimeBudget:
    """train.max_minutes: the step at which the run ends, from timed steps, the same on every
    worker (each extrapolates its own step time; they agree on the smallest answer, so all
    ranks stop, and schedule their lr, alike)."""

    def __init__(self, minutes: float, most_steps: int):
        self.seconds, self.most_steps = minutes * 60, most_steps
        self.start = time.perf_counter()
        self.mark: tuple[int, float] | None = None  # (step, time) the timing runs from
        self.check_at: int | None = None
        self.checks = 0

    def after_step(self, step: int, device) -> int | None:
        """A new total step count when this step re-times the run, else None."""
        now = time.perf_counter()
        if self.mark is None:
            if step >= BUDGET_SKIP_STEPS:
                self.mark, self.check_at = (step, now), step + BUDGET_TIMED_STEPS
            return None
        if step != self.check_at:
            return None
        per_step = (now - self.mark[1]) / (step - self.mark[0])
        fits = step + max(0, int((self.seconds - (now - self.start)) / per_step))
        answer = torch.tensor([min(self.most_steps, fits)], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(answer, op=torch.distributed.ReduceOp.MIN)
        total = int(answer.item())
        self.checks += 1
        later = step + (total - step) // 10
        self.mark = (step, now)
        self.check_at = later if self.checks == 1 and later - step >= BUDGET_TIMED_STEPS else None
        return total


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


def run_loop(config: dict, worker) -> None:
    """The training loop: `config` from `loop_config`, `worker` a `TrainWorker` or alike."""
    cfg = JobConfig.model_validate(config["cfg"])
    job, classes = config["job"], config["classes"]
    rank, world, device = worker.rank, worker.world, worker.device
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    module = build_model(cfg, job, len(classes))
    parameters = parameter_report(module)  # trainable, total, share
    if device.type == "cuda" and cfg.train.strategy == "ddp":
        # Faster convolutions under bf16. Not under FSDP2: it refuses non-contiguous parameters.
        module = module.to(memory_format=torch.channels_last)
    model = parallelize(module, cfg.train, device)
    plain = unwrap(model)
    train_mode(plain)
    head_scale = cfg.finetune.head_lr_scale if job == "finetune" else 1.0
    optimizer = build_optimizer(plain, cfg.train, head_scale)
    total_steps = config["total_steps"]
    scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, total_steps)
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "world": world}
    # This run's own checkpoint: a restart after a worker failure, or a resumed run (maybe on
    # another world size). Failing that, one the caller handed over (a sweep trial that PBT
    # restarts from another trial's checkpoint, or from its own before a pause).
    checkpoint = worker.checkpoint()
    handed_over = checkpoint is None and config["start_from"] is not None
    if handed_over:
        checkpoint = config["start_from"]
    if checkpoint:
        hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        with checkpoint.as_directory() as folder:
            progress = load_checkpoint(Path(folder), model, optimizer)
        if handed_over:
            # Weights, optimizer moments and position come from the checkpoint, but its lr,
            # weight decay, warmup... were another config's (PBT has just mutated them): this
            # config's values, and its schedule from the checkpoint's step.
            for group, values in zip(optimizer.param_groups, hyperparameters):
                group.update(values)
            scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, total_steps, progress["step"])
        else:
            if "total_steps" in progress:  # a time budget fixed the run's length: keep it
                total_steps = progress["total_steps"]
                scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, total_steps)
            scheduler.load_state_dict(progress["scheduler"])

    train_shard = worker.shard("train")
    val_shard = worker.shard("val") if config["has_val"] else None
    evaluates = val_shard is not None and (rank == 0 or cfg.train.strategy == "fsdp")
    use_amp = device.type == "cuda" and cfg.train.strategy == "ddp"  # FSDP2 has its own bf16 policy
    accumulation = cfg.train.accumulation_steps
    step, epoch = progress["step"], progress["epoch"]
    # Batches this worker skips on resume: the ones the run had consumed in this epoch.
    skip = progress["batch_in_epoch"] * progress["world"] // world
    window, micro = Window(), 0
    # Not when a budget has already set the length (a restart or a resumed run).
    timed = cfg.train.max_minutes and "total_steps" not in progress
    budget = TimeBudget(cfg.train.max_minutes, total_steps) if timed else None
    batch_in_epoch, extra = progress["batch_in_epoch"], {}

    def eval_and_report(
        should_eval: bool, should_save: bool, last: bool, trained: dict | None = None
    ) -> None:
        """Report this step's metrics (evaluated when `should_eval`) and, when `should_save`,
        a checkpoint (the run's artifacts too when `last`). `trained`: the training metrics
        (loss, throughput...) when this run trained no steps of its own."""
        nonlocal window, progress
        if trained is None:
            trained = {**window.metrics(world), **{k: float(v) for k, v in extra.items()}}
        metrics = {
            "step": step,
            "epoch": epoch,
            **trained,
            "lr": scheduler.get_last_lr()[0],
            **parameters,
            "peak_memory_mb": peak_memory_mb(device),
            "total_steps": total_steps,  # a sweep tells finished trials from stopped ones by it
        }
        if evaluates and should_eval:
            batches = val_shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device)
            metrics.update(evaluate(plain, batches, job, bf16=device.type == "cuda"))
        confusion = metrics.pop("confusion", None)  # not a scalar: goes to model.json
        progress = {
            **({"total_steps": total_steps} if "total_steps" in progress else {}),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "world": world,
            "scheduler": scheduler.state_dict(),
            "metrics": metrics,  # this model's last report (see handed_over below)
        }
        extra_meta = per_class_report(confusion, classes) if confusion else {}
        report(worker, metrics, model, optimizer, progress, config, should_save, last, extra_meta)
        window = Window()

    if handed_over and step >= total_steps:
        # A PBT trial cloned from another trial's final checkpoint: no steps are left. It
        # still reports once: the checkpoint's model, evaluated, with that model's training
        # metrics from its last report, and its artifacts. Without a report, Tune would keep
        # the trial's earlier metrics beside its mutated config.
        eval_and_report(should_eval=True, should_save=True, last=True, trained=progress.get("metrics", {}))
        return
    while step < total_steps:
        batch_in_epoch = 0
        for batch in train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            drop_last=True,
            device=device,
            local_shuffle_buffer_size=10 * cfg.train.batch_size if cfg.data.shuffle == "local" else None,
        ):
            batch_in_epoch += 1
            if batch_in_epoch <= skip:
                continue
            window.data_wait += time.perf_counter() - window.step_end
            micro += 1
            sync = micro % accumulation == 0
            with gradient_sync(model, sync), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                loss, extra = model(batch)
                (loss / accumulation).backward()
            window.losses.append(loss.item())
            window.images += cfg.train.batch_size
            window.step_end = time.perf_counter()
            if not sync:
                continue
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            window.steps += 1
            if fault_injected(config, step, rank, world, checkpoint is not None):
                os._exit(1)  # a hard crash: no cleanup, no report
            if worker.stop_requested():  # a stopped in-process sweep trial: at once, no report
                return
            timed_total = budget.after_step(step, device) if budget else None
            if timed_total is not None:
                total_steps = progress["total_steps"] = timed_total
                # The schedule decays to zero at the new end.
                scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, total_steps, step)
                if rank == 0:
                    said = f"{cfg.train.max_minutes:g} min budget: {total_steps} steps (timed at step {step})"
                    print(f"[{job}] {said}", flush=True, file=sys.__stdout__)
            last = step >= total_steps
            should_eval = last or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
            should_save = last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
            if step % cfg.train.log_every == 0 and rank == 0:
                w = window.metrics(world)
                recent = np.mean(window.losses[-cfg.train.log_every :])
                print(
                    f"[{job}] step {step}/{total_steps} loss {recent:.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {w['images_per_s']:.0f} img/s "
                    f"data wait {100 * w['data_wait_share']:.0f}%",
                    flush=True,
                    file=sys.__stdout__,  # Ray Train's patched print would also log it: twice
                )
            if should_eval or should_save:
                eval_and_report(should_eval, should_save, last)
            if last:
                break
        else:  # the epoch ran out (not a break): the next one starts from its beginning
            epoch += 1
            skip = 0


def per_class_report(confusion: list[list[int]], classes: list[str]) -> dict:
    """Per-class accuracy and the confusion matrix (rows: true class), for model.json."""
    per_class = {name: row[i] / max(1, sum(row)) for i, (name, row) in enumerate(zip(classes, confusion))}
    return {"per_class_acc": per_class, "confusion": confusion}


def report(worker, metrics, model, optimizer, progress, config, save, final, extra_meta=None) -> None:
    """A report from every rank; checkpoints are collective (each rank saves its shard)."""
    rank = worker.rank
    if not save:
        worker.report(metrics)
        return
    state = full_model_state(model) if final else None  # collective: gathers FSDP shards
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_checkpoint(folder, model, optimizer, progress, rank)
        if final and rank == 0:
            cfg, job = JobConfig.model_validate(config["cfg"]), config["job"]
            meta = {**config["meta"], "metrics": metrics, **(extra_meta or {}), "job": job}
            export_artifacts(folder, state, cfg, job, meta, len(config["classes"]))
            if (folder / "adapter").is_dir():
                metrics = {**metrics, "adapter_bytes": adapter_bytes(folder / "adapter")}
        worker.report(metrics, tmp)


def absolute_uris(cfg: JobConfig) -> JobConfig:
    """Workers run in other folders (and on other nodes): every path becomes absolute."""
    cfg = cfg.model_copy(deep=True)
    for section, key in (("data", "train"), ("data", "val"), ("model", "init"), ("run", "storage")):
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
    if cfg.model.init:
        try:
            init_folder = str(storage.download_dir(cfg.model.init))
            init_meta = read_meta(init_folder)  # fails here, not in every worker
        except (storage.StorageError, ValueError) as err:
            raise ValueError(f"model.init: {err}") from None
    if job == "finetune":
        get_adapter(cfg.finetune.method)
    else:
        get_objective(cfg.objective.name)
    labelled = job == "finetune" or cfg.objective.name == "supervised"
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
    backbone = create_backbone(cfg.model.name, cfg.model.kwargs)  # also checks name and kwargs
    if cfg.model.init:
        try:
            check_backbone_weights(backbone, init_folder, init_meta)
        except ValueError as err:
            raise ValueError(f"model.init: {err} (model.name is {cfg.model.name})") from None
    pre = preprocessing_config(backbone, cfg.data.image_size)
    if job == "pretrain":  # builds the objective once: a mismatch with model or data fails here
        objective_cls = get_objective(cfg.objective.name)
        objective_cls(backbone.num_features, cfg.objective, len(classes), backbone=backbone)
    nested_dims(cfg.objective, backbone.num_features)  # Matryoshka dims must fit the embedding
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


def build_trainer(cfg: JobConfig, job: str, plan: dict, callbacks=(), start_from=None):
    """One TorchTrainer for this job (also what each sweep trial builds).

    `start_from`: a checkpoint (of any run of this job and model) that a new run starts from:
    weights, optimizer state and position, with this config's hyperparameters. (Train v2 has
    no `resume_from_checkpoint`; a run's own checkpoints still come first, on restarts.)
    """
    from ray.train.torch import TorchTrainer

    use_gpu = uses_gpu(cfg)
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


MIN_BLOCK_ROWS = 512


def cached_input(uri: str, limit: int | None, cache_mb: float):
    """The encoded rows of a dataset: held in Ray's object store when they are small.

    Each epoch runs the Ray Data pipeline again, and on a 2-CPU machine reading the Parquet
    files again cost 1.2-2 s per epoch, while one pass over the same rows (1,438 digits) held
    in the object store took 0.13 s, shuffle and map included. A small dataset is read here,
    in the driver, not by Ray Data read tasks: starting their worker processes took 7 s on
    2 CPUs for a 116 KB dataset. Decoding and augmentation still run every epoch, after the
    cache: each epoch sees new augmentations.
    """
    store_bytes = ray.cluster_resources().get("object_store_memory", 0)
    columns = training_columns(uri)
    if storage.parquet_bytes(uri) > min(cache_mb * 2**20, store_bytes / 4):
        return read_dataset(uri, limit, columns)
    return ray.data.from_arrow(read_table(uri, limit, columns))


def input_datasets(cfg: JobConfig, job: str, pre: dict) -> dict:
    """The Ray Data pipelines of a run: decoding and augmentation as tasks beside the workers.

    Reproducible on `seed`: the global shuffle is seeded (a new order each epoch, the same
    orders in every run) and so are the SSL views of each batch (preprocess_batch).
    """
    mode = "ssl" if job == "pretrain" and get_objective(cfg.objective.name).views == 2 else "eval"
    # Their progress bars would interleave with the workers' progress lines: off.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train = cached_input(cfg.data.train, cfg.data.limit, cfg.data.cache_mb)
    if cfg.data.balance:  # before the shuffle, so the repeated rows of a class spread out
        repeats = class_repeats(cfg.data.train, cfg.data.limit)
        train = train.map_batches(
            balance_rows, batch_format="pyarrow", fn_kwargs={"repeats": repeats, "seed": cfg.seed}
        )
    seed = None
    if cfg.data.shuffle == "global":  # datasets are often sorted by class (CIFAR-10's files are)
        # Shuffles the encoded rows, before decoding; reseeded after each epoch.
        train = train.random_shuffle(
            seed=ray.data.RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True)
        )
        seed = cfg.seed  # batches differ every epoch, so seeded views do too
    # Small batches: a worker's first step waits for one batch, not for a 1,024-image block.
    batch = cfg.train.batch_size
    options = {"pre": pre, "mode": mode, "hflip": cfg.data.hflip, "seed": seed}
    # Blocks of at most `rows` (streaming): a Parquet file is read as one block, and the tasks
    # that decode and augment work block by block, so without this one task does a whole
    # file's work while the other CPUs and the workers wait (a GPU worker went from 143 to
    # 3,277 img/s with 256-row blocks, benchmarks/RESULTS.md). Not much smaller: each block
    # costs a task, and 32-row blocks slowed the 2-CPU quickstart.
    rows = max(batch, MIN_BLOCK_ROWS)
    train = train.repartition(target_num_rows_per_block=rows)
    datasets = {"train": train.map_batches(preprocess_batch, batch_size=batch, fn_kwargs=options)}
    if cfg.data.val:
        val = cached_input(cfg.data.val, None, cfg.data.cache_mb).repartition(target_num_rows_per_block=rows)
        datasets["val"] = val.map_batches(
            preprocess_batch, batch_size=batch, fn_kwargs={"pre": pre, "mode": "eval"}
        )
    return datasets


def checkpoint_policy(cfg: JobConfig) -> ray.train.CheckpointConfig:
    """keep_last newest checkpoints, or keep_last best by `train.keep_best` (Ray Train keeps
    the newest as well, so a restart resumes where the run stopped)."""
    best = cfg.train.keep_best
    return ray.train.CheckpointConfig(
        num_to_keep=cfg.train.keep_last,
        checkpoint_score_attribute=best,
        checkpoint_score_order="min" if best == "loss" else "max",
    )


def publish_result(result, cfg: JobConfig, job: str, run_name: str) -> dict[str, str]:
    """Copy the final checkpoint's artifacts to `{storage}/{run}/model` (and `/adapter`)."""
    run_uri = storage.join(storage.normalize(cfg.run.storage), run_name)
    published = {}
    with result.checkpoint.as_directory() as folder:
        for name in ("adapter", "model"):
            if (Path(folder) / name).is_dir():
                uri = storage.join(run_uri, name)
                with storage.publish_dir(uri, overwrite=True) as staging:
                    shutil.copytree(Path(folder) / name, staging, dirs_exist_ok=True)
                published[name] = uri
        model_json = Path(folder) / "model" / "model.json"
        if model_json.is_file():
            write_confusion_png(run_uri, json.loads(model_json.read_text()))
    return published


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
        from system.linear_probe import run_linear_probe

        return run_linear_probe(cfg, plan)
    trainer = build_trainer(cfg, job, plan, callbacks=[MetricsLogger(cfg.run.storage, plan["run_name"])])
    result = trainer.fit()
    published = publish_result(result, cfg, job, plan["run_name"])
    summary = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    print(f"[{job}] done: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items()), flush=True)
    return published
