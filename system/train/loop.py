"""The training loop every worker runs (a Ray Train worker, or a sweep's in-process trial).

    run_loop(config, worker)   config: plan.loop_config(...); worker: run.TrainWorker or alike

Split as torchtitan's train.py is: `train_step` (forward, backward, and the optimizer step
every `train.accumulation_steps` micro-batches), `report` (metrics, evaluation and
checkpoints), and `run` (epochs until the planned or time-budgeted step count). When to
evaluate, checkpoint and log is decided by small named cadences (`Every`), not by flags
inside the loop.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from system.adapters.registry import adapter_bytes, parameter_report
from system.config import JobConfig
from system.data.device_decode import device_collate
from system.train.checkpoint import full_model_state, load_checkpoint, save_checkpoint
from system.train.evaluate import evaluate, per_class_report
from system.train.export import export_artifacts
from system.train.inputs import decode_options
from system.train.module import build_model, train_mode
from system.train.optim import build_optimizer, cosine_with_warmup
from system.train.parallel import gradient_sync, parallelize, unwrap
from system.train.progress import TimeBudget, Window, fault_injected, mean_loss, peak_memory_mb


@dataclass(frozen=True)
class Every:
    """A cadence: due every `n`-th optimizer step (never when `n` is 0 or None) and at the last step."""

    n: int | None

    def due(self, step: int, last: bool = False) -> bool:
        return last or bool(self.n and step % self.n == 0)


def run_loop(config: dict, worker) -> None:
    """The training loop: `config` from `plan.loop_config`, `worker` a `TrainWorker` or alike."""
    TrainLoop(config, worker).run()


def say(text: str) -> None:
    # sys.__stdout__: Ray Train's patched print would log the line twice.
    print(text, flush=True, file=sys.__stdout__)


class TrainLoop:
    """One worker's model, optimizer, schedule and position, and the steps that move them."""

    def __init__(self, config: dict, worker):
        cfg = self.cfg = JobConfig.model_validate(config["cfg"])
        self.config, self.worker = config, worker
        self.job, self.classes = config["job"], config["classes"]
        self.device = worker.device
        torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        module = build_model(cfg, self.job, len(self.classes))
        self.parameters = parameter_report(module)  # trainable, total, share
        if self.device.type == "cuda" and cfg.train.strategy == "ddp":
            # Faster convolutions under bf16. Not under FSDP2: it refuses non-contiguous parameters.
            module = module.to(memory_format=torch.channels_last)
        self.model = parallelize(module, cfg.train, self.device)
        self.plain = unwrap(self.model)
        train_mode(self.plain)
        head_scale = cfg.finetune.head_lr_scale if self.job == "finetune" else 1.0
        self.optimizer = build_optimizer(self.plain, cfg.train, head_scale)
        self.total_steps = config["total_steps"]
        self.scheduler = cosine_with_warmup(self.optimizer, cfg.train.warmup_steps, self.total_steps)
        self.progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "world": worker.world}
        self.restore()
        self.step, self.epoch = self.progress["step"], self.progress["epoch"]
        self.batch_in_epoch = self.progress["batch_in_epoch"]
        # Batches this worker skips on resume: the ones the run had consumed in this epoch.
        self.skip = self.progress["batch_in_epoch"] * self.progress["world"] // worker.world
        self.window, self.extra, self.micro = Window(), {}, 0
        # Not when a budget has already set the length (a restart or a resumed run).
        timed = cfg.train.max_minutes and "total_steps" not in self.progress
        self.budget = TimeBudget(cfg.train.max_minutes, self.total_steps) if timed else None
        self.val_shard = worker.shard("val") if config["has_val"] else None
        self.evaluates = self.val_shard is not None and (worker.rank == 0 or cfg.train.strategy == "fsdp")
        self.use_amp = self.device.type == "cuda" and cfg.train.strategy == "ddp"  # FSDP2: its own bf16
        self.eval_cadence, self.save_cadence = Every(cfg.train.eval_every), Every(cfg.train.checkpoint_every)
        self.log_cadence = Every(cfg.train.log_every)

    def restore(self) -> None:
        """Continue from this run's own checkpoint (a restart after a worker failure, or a resumed
        run, maybe on another world size); failing that, from one the caller handed over (a sweep
        trial that PBT restarts from another trial's checkpoint, or from its own before a pause)."""
        cfg, optimizer = self.cfg, self.optimizer
        self.resumed_from: int | None = None
        self.checkpoint = self.worker.checkpoint()
        self.handed_over = self.checkpoint is None and self.config["start_from"] is not None
        if self.handed_over:
            self.checkpoint = self.config["start_from"]
        if not self.checkpoint:
            return
        hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        with self.checkpoint.as_directory() as folder:
            self.progress = load_checkpoint(Path(folder), self.model, optimizer)
        if not self.handed_over:  # reported from now on: where a restart or resume picked up
            self.resumed_from = self.progress["step"]
        if self.handed_over:
            # Weights, optimizer moments and position come from the checkpoint, but its lr,
            # weight decay, warmup... were another config's (PBT has just mutated them): this
            # config's values, and its schedule from the checkpoint's step.
            for group, values in zip(optimizer.param_groups, hyperparameters):
                group.update(values)
            step = self.progress["step"]
            self.scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, self.total_steps, step)
            return
        if "total_steps" in self.progress:  # a time budget fixed the run's length: keep it
            self.total_steps = self.progress["total_steps"]
            self.scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, self.total_steps)
        self.scheduler.load_state_dict(self.progress["scheduler"])

    def run(self) -> None:
        cfg = self.cfg
        if self.handed_over and self.step >= self.total_steps:
            # A PBT trial cloned from another trial's final checkpoint: no steps are left. It
            # still reports once: the checkpoint's model, evaluated, with that model's training
            # metrics from its last report, and its artifacts. Without a report, Tune would keep
            # the trial's earlier metrics beside its mutated config.
            self.report(evaluated=True, saved=True, last=True, trained=self.progress.get("metrics", {}))
            return
        train_shard = self.worker.shard("train")
        collate = None
        if cfg.train.gpu_decode:  # encoded rows: decoded and augmented here, on the GPU
            options = decode_options(cfg, self.job, self.config["meta"]["preprocessing"])
            collate = device_collate(**options, device=self.device)
        while self.step < self.total_steps:
            self.batch_in_epoch = 0
            for batch in train_shard.iter_torch_batches(
                batch_size=cfg.train.batch_size,
                drop_last=True,
                device=self.device,
                local_shuffle_buffer_size=10 * cfg.train.batch_size if cfg.data.shuffle == "local" else None,
                collate_fn=collate,
            ):
                self.batch_in_epoch += 1
                if self.batch_in_epoch <= self.skip:
                    continue
                if not self.train_step(batch):
                    continue  # a micro-batch of gradient accumulation
                if fault_injected(self.config, self.step, self.worker.rank, self.worker.world, self.resumed):
                    os._exit(1)  # a hard crash: no cleanup, no report
                if self.worker.stop_requested():  # a stopped in-process sweep trial: at once, no report
                    return
                self.apply_budget()
                last = self.step >= self.total_steps
                self.log()
                evaluated, saved = (
                    self.eval_cadence.due(self.step, last),
                    self.save_cadence.due(self.step, last),
                )
                if evaluated or saved:
                    self.report(evaluated, saved, last)
                if last:
                    break
            else:  # the epoch ran out (not a break): the next one starts from its beginning
                self.epoch += 1
                self.skip = 0

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    def train_step(self, batch: dict) -> bool:
        """Forward and backward one micro-batch; True when it also stepped the optimizer."""
        cfg, window = self.cfg, self.window
        window.data_wait += time.perf_counter() - window.step_end
        self.micro += 1
        sync = self.micro % cfg.train.accumulation_steps == 0
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.use_amp)
        with gradient_sync(self.model, sync), autocast:
            loss, self.extra = self.model(batch)
            (loss / cfg.train.accumulation_steps).backward()
        window.losses.append(loss.detach())  # read every log_every steps (mean_loss), not here
        window.images += cfg.train.batch_size
        window.step_end = time.perf_counter()
        if not sync:
            return False
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.plain.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        window.steps += 1
        return True

    def apply_budget(self) -> None:
        """train.max_minutes: once the budget has timed enough steps, the run's new length."""
        timed_total = self.budget.after_step(self.step, self.device) if self.budget else None
        if timed_total is None:
            return
        self.total_steps = self.progress["total_steps"] = timed_total
        # The schedule decays to zero at the new end.
        self.scheduler = cosine_with_warmup(
            self.optimizer, self.cfg.train.warmup_steps, timed_total, self.step
        )
        if self.worker.rank == 0:
            minutes = self.cfg.train.max_minutes
            say(f"[{self.job}] {minutes:g} min budget: {timed_total} steps (timed at step {self.step})")

    def log(self) -> None:
        if not self.log_cadence.due(self.step) or self.worker.rank != 0:
            return
        w = self.window.metrics(self.worker.world)
        recent = mean_loss(self.window.losses[-self.cfg.train.log_every :])
        say(
            f"[{self.job}] step {self.step}/{self.total_steps} loss {recent:.4f} "
            f"lr {self.scheduler.get_last_lr()[0]:.2e} {w['images_per_s']:.0f} img/s "
            f"data wait {100 * w['data_wait_share']:.0f}%"
        )

    def report(self, evaluated: bool, saved: bool, last: bool, trained: dict | None = None) -> None:
        """Report this step's metrics (with validation when `evaluated`) and, when `saved`, a
        checkpoint (the run's artifacts too when `last`). `trained`: the training metrics
        (loss, throughput...) when this run trained no steps of its own."""
        if trained is None:
            trained = {
                **self.window.metrics(self.worker.world),
                **{k: float(v) for k, v in self.extra.items()},
            }
        metrics = {
            "step": self.step,
            "epoch": self.epoch,
            **trained,
            "lr": self.scheduler.get_last_lr()[0],
            **self.parameters,
            "peak_memory_mb": peak_memory_mb(self.device),
            "total_steps": self.total_steps,  # a sweep tells finished trials from stopped ones by it
            **({"resumed_from_step": self.resumed_from} if self.resumed_from is not None else {}),
        }
        if self.evaluates and evaluated:
            batches = self.val_shard.iter_torch_batches(
                batch_size=self.cfg.train.batch_size, device=self.device
            )
            metrics.update(evaluate(self.plain, batches, self.job, bf16=self.device.type == "cuda"))
        confusion = metrics.pop("confusion", None)  # not a scalar: goes to model.json
        self.progress = {
            **({"total_steps": self.total_steps} if "total_steps" in self.progress else {}),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world": self.worker.world,
            "scheduler": self.scheduler.state_dict(),
            "metrics": metrics,  # this model's last report (see handed_over in run)
        }
        extra_meta = per_class_report(confusion, self.classes) if confusion else {}
        save_report(
            self.worker,
            metrics,
            self.model,
            self.optimizer,
            self.progress,
            self.config,
            saved,
            last,
            extra_meta,
        )
        self.window = Window()


def save_report(worker, metrics, model, optimizer, progress, config, save, final, extra_meta=None) -> None:
    """A report from every rank; checkpoints are collective (each rank saves its shard)."""
    if not save:
        worker.report(metrics)
        return
    state = full_model_state(model) if final else None  # collective: gathers FSDP shards
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_checkpoint(folder, model, optimizer, progress, worker.rank)
        if final and worker.rank == 0:
            cfg, job = JobConfig.model_validate(config["cfg"]), config["job"]
            meta = {**config["meta"], "metrics": metrics, **(extra_meta or {}), "job": job}
            export_artifacts(folder, state, cfg, job, meta, len(config["classes"]))
            if (folder / "adapter").is_dir():
                metrics = {**metrics, "adapter_bytes": adapter_bytes(folder / "adapter")}
        worker.report(metrics, tmp)
