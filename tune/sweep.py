"""Hyperparameter and adapter-rank sweeps: Ray Tune over Ray Train runs.

    repforge sweep --config configs/quickstart.yaml --set run.name=my-sweep
    repforge sweep --config configs/quickstart.yaml --set run.name=my-sweep --resume

Each Tune trial is a small driver function that applies its overrides (dotted keys from
`sweep.space`) to the base config and fits its own TorchTrainer, the one a plain
`repforge finetune` would build; every report of the Train run goes on to Tune, where the
scheduler (`sweep.scheduler`: ASHA, PBT or FIFO) stops weak trials early (ASHA) or
restarts them from a strong trial's checkpoint with mutated hyperparameters (PBT), and
the search algorithm (`sweep.search`: random, grid, Optuna TPE, multi-objective Optuna)
proposes the next ones (tune/search.py). Under PBT each report carries a copy of its
checkpoint into Tune (`ReportToTune`), and a trial that Tune starts from a checkpoint
(another trial's, or its own after a pause or on --resume) fits a new Train run,
`trials/<id>/gen-<n>`, from it: the checkpoint's weights, optimizer moments and step, the
trial's current hyperparameters (system/train.py); its reports to Tune name that trial in
`started_from`. With `sweep.rank_prior` a spectrum pre-pass
proposes `finetune.rank_pattern` (tune/ranks.py). The sweep folder
`{run.storage}/{run.name}/` gets `leaderboard.csv`, `pareto.csv` + `pareto.png` (metric
vs trainable parameters), `best.yaml` (runnable with `repforge finetune --config`), the
best trial's `best/model` (and `best/adapter`), each trial's `trials/<id>/metrics.jsonl`,
`rank_prior.json` when used, and Tune's own state in `_tune/` (with PBT: the checkpoint
copies, and `pbt_global.txt`, one line per exploit). The trials' Train runs live in
`{storage}/_ray/`. A trial that fails is an ERROR row; the others go on. tune/results.py
writes the leaderboard, the front and the best trial's files once Tune has finished.

With `sweep.in_process: true` (one-worker trials; ASHA or FIFO) a trial fits no
TorchTrainer: its own Tune process runs the same training loop and reports straight to
Tune (tune/in_process.py), which saves the start of a Train run on every trial, the most
of what a short or early-stopped trial costs. Its checkpoints are Tune's, in `_tune/`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from pyarrow import fs as pafs
from ray import tune
from ray.util.queue import Empty, Queue

from system import storage
from system.config import ConfigError, JobConfig, build_config, set_dotted
from system.data.dataset import read_classes
from system.ray_env import ensure_ray, omp_env
from system.train import build_trainer, plan_run, run_record, uses_gpu
from system.train.callbacks import MetricsLogger
from system.train.plan import absolute_uris, train_storage
from tune.callbacks import ControllerHandoff, ReportToTune
from tune.in_process import stop_trial, train_in_process, trial_resources
from tune.ranks import describe, spectrum_prior
from tune.results import trial_id_in, with_overrides, write_results
from tune.search import build_scheduler, build_searcher, check_search, grid_space
from tune.space import tune_space, validate_space

TUNE_DIR = "_tune"
DRIVER_MEMORY = 256 * 2**20
# What --resume may change: where the sweep is, and how many trials run at once.
RESUME_MAY_CHANGE = ("run", "sweep.max_concurrent")
VAL_METRICS = {"val_acc": "finetune", "knn_acc": None, "rankme": None}  # need data.val; val_acc: finetune


def sweep_trial(config: dict, base: dict, job: str, sweep_name: str, forward_checkpoints: bool) -> None:
    """One Tune trial: the base config plus this trial's overrides, trained by Ray Train."""
    tree = with_overrides(base, config["overrides"])
    trial_id = tune.get_context().get_trial_id()
    trial_run = f"{sweep_name}/trials/{trial_id}"
    set_dotted(tree, "run.name", trial_run)
    cfg = build_config(tree)
    plan = plan_run(cfg, job)
    start_from = tune.get_checkpoint()  # PBT: another trial's; or its own, after a pause
    source = ""
    if start_from is not None:
        source = trial_id_in(os.path.dirname(start_from.path))
        print(f"[sweep] trial {trial_id} goes on from trial {source}'s {start_from.path}", flush=True)
    logger = MetricsLogger(cfg.run.storage, trial_run)  # trials/{id}/metrics.jsonl: all its runs
    if cfg.sweep.in_process:  # no Train run: this process trains (tune/in_process.py)
        train_in_process(cfg, job, plan, start_from, logger)
        return
    # The Train run is named after the trial, so a resumed sweep resumes its Train runs too. A
    # trial that Tune starts from a checkpoint needs a new Train run: one of an existing name
    # would resume its own latest checkpoint instead.
    if start_from is not None:
        plan["run_name"] = _next_generation(cfg.run.storage, trial_run)
    handoff, staging = _handoff_path(trial_id), _staging_path(trial_id)
    callbacks = [logger, ControllerHandoff(str(handoff))]
    _RUNNING.add(trial_id)
    try:
        if forward_checkpoints:  # PBT: reports carry checkpoints to Tune (see tune/callbacks.py)
            reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
            callbacks.append(ReportToTune(reports, str(staging)))
            trainer = build_trainer(cfg, job, plan, callbacks=callbacks, start_from=start_from)
            _fit_and_report(trainer, reports, {"started_from": source})
        else:  # ASHA, FIFO: Ray's own callback forwards metrics (and the checkpoint's path)
            from ray.tune.integration.ray_train import TuneReportCallback

            build_trainer(cfg, job, plan, callbacks=[TuneReportCallback(), *callbacks]).fit()
    except Exception:
        if trial_id not in _STOPPING:  # an abort we asked for is not a failure
            raise
    finally:
        _RUNNING.discard(trial_id)
        handoff.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)


def _fit_and_report(trainer, reports: Queue, extra: dict) -> None:
    """Fit in a thread while this one, Tune's, reports to Tune what the Train run reports."""
    failure = []

    def fit():
        try:
            trainer.fit()
        except BaseException as err:  # raised again in Tune's thread
            failure.append(err)

    thread = threading.Thread(target=fit, daemon=True)  # daemon: a stopped trial does not wait
    thread.start()
    while True:
        finished = not thread.is_alive()  # before the get: a report put before the end is not lost
        try:
            metrics, local = reports.get(timeout=1)
        except Empty:
            if finished:
                break
            continue
        checkpoint = tune.Checkpoint.from_directory(local) if local else None
        tune.report({**metrics, **extra}, checkpoint=checkpoint)  # Tune copies the checkpoint
        if local:
            shutil.rmtree(local, ignore_errors=True)
    if failure:
        raise failure[0]


def _next_generation(storage_root: str, trial_run: str) -> str:
    """`{trial_run}/gen-<n>`, a Train run name that no earlier start of this trial used."""
    fs, path = storage.filesystem(storage.join(train_storage(storage_root), trial_run))
    runs = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return f"{trial_run}/gen-{1 + sum(info.base_name.startswith('gen-') for info in runs)}"


# When a scheduler stops a trial, Tune ends the trial's actor (or reuses it for the next
# trial) while the Train controller it started runs on; the Train workers' placement group
# (their CPUs) would stay reserved until Ray Train's cleaner notices, which takes the
# dashboard's state API. So a stopping trial aborts its Train run first, through the
# controller's actor handle, which the controller leaves in a file (Ray Train places the
# controller on the trial's node).
_RUNNING: set[str] = set()  # trials of this process whose Train run is under way (at most one)
_STOPPING: set[str] = set()


def _handoff_path(trial_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"repforge-train-controller-{os.getpid()}-{trial_id}"


def _staging_path(trial_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"repforge-tune-checkpoints-{os.getpid()}-{trial_id}"


def _abort_train_runs() -> None:
    """Abort the Train run of every trial of this process still under way."""
    for trial_id in list(_RUNNING):
        path = _handoff_path(trial_id)
        if not path.exists():  # its controller has not started yet
            continue
        _STOPPING.add(trial_id)
        try:
            ray.get(ray.cloudpickle.loads(path.read_bytes()).abort.remote(), timeout=60)
        except Exception:  # noqa: S110 - the controller exits while answering
            pass


def _trial_trainable(fn):
    """The function trainable for `fn`; before Tune stops its actor or reuses it for another
    trial, it aborts the Train run still under way. (On reuse, Tune has already set
    `self.trial_id` to the next trial's: hence every run of the process, not this id's.)"""
    from ray.tune.trainable.function_trainable import wrap_function

    class SweepTrial(wrap_function(fn)):
        def cleanup(self):
            stop_trial()
            _abort_train_runs()
            super().cleanup()

        def reset_config(self, new_config):
            stop_trial()  # an in-process trial's loop returns; Tune waits 2 s for it
            _abort_train_runs()
            return super().reset_config(new_config)

    return SweepTrial


def run_sweep(cfg: JobConfig, job: str = "finetune", resume: bool = False) -> str:
    """Run (or resume) the sweep described by `cfg.sweep`; returns the sweep folder URI."""
    cfg = absolute_uris(cfg)
    validate_space(cfg)
    check_search(cfg)
    _default_metric(cfg, job)
    _check_metric(cfg, job)
    plan = plan_run(cfg, job)
    prior = None
    if cfg.sweep.rank_prior and job == "finetune":  # deterministic: recomputed on --resume too
        prior = spectrum_prior(cfg, cfg.sweep.rank_prior)
        # The user's patterns first: the first pattern that matches a module sets its rank.
        user = cfg.finetune.rank_pattern
        cfg.finetune.rank_pattern = {**user, **{k: v for k, v in prior.items() if k not in user}}
        print(f"[sweep] rank prior at energy {cfg.sweep.rank_prior}: {describe(prior)}", flush=True)
    name = cfg.run.name or f"sweep-{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_uri = storage.join(cfg.run.storage, name)
    tune_uri = storage.join(sweep_uri, TUNE_DIR)
    if resume and not cfg.run.name:
        raise ConfigError("run.name: --resume needs the name of the sweep to continue")
    if resume and not tune.Tuner.can_restore(tune_uri):
        raise ConfigError(f"run.name: no sweep to resume at {sweep_uri}")
    if not resume and storage.exists(sweep_uri):
        raise ConfigError(f"run.name: sweep folder exists: {sweep_uri} (pass --resume, or another run.name)")
    if resume:  # the trials still to run must be the sweep's own (concurrency may change)
        run_record.check_same(sweep_uri, cfg.model_dump(), "sweep", ignore=RESUME_MAY_CHANGE)
    if prior is not None and not resume:
        storage.write_text(storage.join(sweep_uri, "rank_prior.json"), json.dumps(prior, indent=1))
    ensure_ray(runtime_env=omp_env())

    # Only PBT restarts trials from checkpoints; other schedulers are spared the copies.
    pbt = cfg.sweep.scheduler == "pbt"
    trainable = _trial_trainable(
        tune.with_parameters(
            sweep_trial, base=cfg.model_dump(), job=job, sweep_name=name, forward_checkpoints=pbt
        )
    )
    # The driver function only waits on its Train run: the CPUs go to the workers and Ray Data.
    # (Tune refuses an empty request, so it asks for some memory instead of a CPU.) An
    # in-process trial trains itself: it asks for the worker's CPUs (and GPU).
    resources = trial_resources(cfg) if cfg.sweep.in_process else {"CPU": 0, "memory": DRIVER_MEMORY}
    trainable = tune.with_resources(trainable, resources)
    reports = _reports_per_trial(plan["total_steps"], cfg.train.eval_every)
    if reports == 1 and cfg.sweep.scheduler == "asha":
        print("[sweep] each trial reports once (train.eval_every is 0 or large): no trial can stop early")
    interval = cfg.sweep.perturbation_interval
    if pbt and reports <= interval:
        print(f"[sweep] each trial reports {reports} times, pbt compares every {interval}: no exploits")
    space = tune_space(_search_space(cfg))
    if resume:
        tuner = tune.Tuner.restore(tune_uri, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"overrides": space},
            tune_config=tune.TuneConfig(
                # The scheduler and searcher carry metric and mode (optuna_mo has two of each).
                num_samples=cfg.sweep.num_samples,
                # The next trial starts in the last one's process, where torch and timm are
                # imported already: 6 s less between trials on 2 CPUs. Not under PBT: with
                # its pauses and clones, reports came back under one trial's id.
                reuse_actors=not pbt,
                scheduler=build_scheduler(cfg, reports),
                search_alg=build_searcher(cfg, _concurrency(cfg)),
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=sweep_uri,
                # One failing trial is recorded on the leaderboard; the others go on.
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                # In-process trials report their checkpoints to Tune: keep as few as Train would.
                # (Not under PBT, whose exploits clone older checkpoints.)
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=cfg.train.keep_last if cfg.sweep.in_process else None
                ),
                verbose=1,
            ),
        )
    try:
        grid = tuner.fit()
    except tune.TuneError as err:
        raise _unreported_metric(err, cfg.sweep.metric) or err from None
    # Recorded once Tune has state here, so that a start that failed before can be run again.
    if not storage.exists(storage.join(sweep_uri, run_record.CONFIG_FILE)):
        run_record.record(sweep_uri, cfg.model_dump())
    if not _finished(tune_uri, _expected_trials(cfg)):
        print(f"[sweep] {name} interrupted; continue it with --resume (same run.name)", flush=True)
        raise KeyboardInterrupt
    write_results(grid, cfg, job, name, sweep_uri)
    return sweep_uri


def _search_space(cfg: JobConfig) -> dict:
    return grid_space(cfg.sweep.space) if cfg.sweep.search == "grid" else cfg.sweep.space


def _expected_trials(cfg: JobConfig) -> int:
    space = _search_space(cfg)
    grids = [spec["grid"] for spec in space.values() if isinstance(spec, dict) and "grid" in spec]
    return cfg.sweep.num_samples * math.prod(len(values) for values in grids)


def _finished(tune_uri: str, expected: int) -> bool:
    """Tune turns Ctrl+C into an early, normal return; its saved state tells the two apart."""
    trials = tune.ExperimentAnalysis(tune_uri).trials
    return len(trials) >= expected and all(t.status in ("TERMINATED", "ERROR") for t in trials)


def _default_metric(cfg: JobConfig, job: str) -> None:
    """Pretraining sweeps have no val_acc: kNN top-1 when data.val has labels, else RankMe (label-free)."""
    if job == "pretrain" and cfg.sweep.metric == "val_acc" and cfg.data.val:
        cfg.sweep.metric = "knn_acc" if read_classes(cfg.data.val) else "rankme"
        cfg.sweep.mode = "max"


def _check_metric(cfg: JobConfig, job: str) -> None:
    metric = cfg.sweep.metric
    if metric in VAL_METRICS and not cfg.data.val:
        raise ConfigError(f"sweep.metric: {metric} is measured on data.val, which is not set")
    if VAL_METRICS.get(metric) not in (None, job):
        raise ConfigError(f"sweep.metric: {metric} is only reported by {VAL_METRICS[metric]} runs")


def _unreported_metric(err: Exception, metric: str) -> ConfigError | None:
    """Tune stops the sweep when a result lacks the scheduler's metric: say so in one line.

    Checked then rather than up front because an objective's extra metrics (any registered
    objective may add some) are only known once a run reports them."""
    if "did not include the specified metric" not in str(err):
        return None
    reported = re.search(r"Result: \{(.*?)\}", str(err))
    names = re.findall(r"'([a-z][a-z0-9_]*)':", reported.group(1)) if reported else []
    known = ", ".join(n for n in names if n not in TUNE_RESULT_KEYS)
    return ConfigError(
        f"sweep.metric: the runs report no {metric!r}" + (f" (they report: {known})" if known else "")
    )


# Keys Tune adds to every result (not metrics of the runs).
TUNE_RESULT_KEYS = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "checkpoint_path",
}  # fmt: skip


def _reports_per_trial(total_steps: int, eval_every: int) -> int:
    if not eval_every:
        return 1
    return total_steps // eval_every + (1 if total_steps % eval_every else 0)


def _concurrency(cfg: JobConfig) -> int:
    """sweep.max_concurrent, or the trials that fit; a warning when the setting exceeds the fit
    (on 2 CPUs, two quickstart trials side by side starved each other's data pipelines)."""
    fit = _max_concurrent(cfg)
    wanted = cfg.sweep.max_concurrent
    if wanted and wanted > fit:
        print(
            f"[sweep] warning: sweep.max_concurrent={wanted}, but the cluster fits {fit} trial(s) at a "
            f"time ({cfg.train.workers} x {cfg.train.cpus_per_worker:g} CPUs + 1 for Ray Data each): "
            "trials side by side may starve each other's data pipelines",
            file=sys.stderr,
            flush=True,
        )
    return wanted or fit


def _max_concurrent(cfg: JobConfig) -> int:
    """Trials that fit the cluster: each needs its workers plus about one CPU for Ray Data."""
    resources = ray.cluster_resources()
    per_trial = cfg.train.workers * cfg.train.cpus_per_worker + 1
    fit = int(resources.get("CPU", 1) // per_trial)
    if uses_gpu(cfg):
        fit = min(fit, int(resources.get("GPU", 0) // cfg.train.workers))
    return max(1, fit)
