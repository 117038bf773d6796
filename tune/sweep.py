"""Hyperparameter and adapter-rank sweeps: Ray Tune over Ray Train runs, with ASHA.

    repforge sweep --config configs/quickstart.yaml --set run.name=my-sweep
    repforge sweep --config configs/quickstart.yaml --set run.name=my-sweep --resume

Each Tune trial is a small driver function that applies its overrides (dotted keys from
`sweep.space`) to the base config and fits its own TorchTrainer, the one a plain
`repforge finetune` would build; a TuneReportCallback forwards every report to Tune,
where ASHA stops the weak trials early. The sweep folder `{run.storage}/{run.name}/`
gets `leaderboard.csv`, `best.yaml` (runnable with `repforge finetune --config`), the
best trial's `best/model` (and `best/adapter`), each trial's `trials/<id>/metrics.jsonl`
and Tune's own state in `_tune/`. The trials' Train runs live in `{storage}/_ray/`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from types import SimpleNamespace

import ray
import yaml
from ray import tune

from system import storage
from system.config import ConfigError, JobConfig, build_config, set_dotted
from system.data import count_rows
from system.train import MetricsLogger, absolute_uris, build_trainer, plan_run, publish_result
from tune.space import tune_space, validate_space

TUNE_DIR = "_tune"
DRIVER_MEMORY = 256 * 2**20
VAL_METRICS = {"val_acc": "finetune", "knn_acc": None, "rankme": None}  # need data.val; val_acc: finetune


def sweep_trial(config: dict, base: dict, job: str, sweep_name: str) -> None:
    """One Tune trial: the base config plus this trial's overrides, trained by Ray Train."""
    from ray.tune.integration.ray_train import TuneReportCallback

    tree = _with_overrides(base, config["overrides"])
    # The Train run is named after the trial, so a resumed sweep resumes its Train runs too.
    trial_id = tune.get_context().get_trial_id()
    set_dotted(tree, "run.name", f"{sweep_name}/trials/{trial_id}")
    cfg = build_config(tree)
    plan = plan_run(cfg, job)
    callbacks = [TuneReportCallback(), MetricsLogger(cfg.run.storage, plan["run_name"])]
    build_trainer(cfg, job, plan, callbacks=callbacks).fit()


def run_sweep(cfg: JobConfig, job: str = "finetune", resume: bool = False) -> str:
    """Run (or resume) the sweep described by `cfg.sweep`; returns the sweep folder URI."""
    from ray.tune.schedulers import ASHAScheduler

    cfg = absolute_uris(cfg)
    validate_space(cfg)
    _check_metric(cfg, job)
    plan = plan_run(cfg, job)
    name = cfg.run.name or f"sweep-{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_uri = storage.join(cfg.run.storage, name)
    tune_uri = storage.join(sweep_uri, TUNE_DIR)
    if resume and not cfg.run.name:
        raise ConfigError("run.name: --resume needs the name of the sweep to continue")
    if resume and not tune.Tuner.can_restore(tune_uri):
        raise ConfigError(f"run.name: no sweep to resume at {sweep_uri}")
    if not resume and storage.exists(sweep_uri):
        raise ConfigError(f"run.name: sweep folder exists: {sweep_uri} (pass --resume, or another run.name)")
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}})

    trainable = tune.with_parameters(sweep_trial, base=cfg.model_dump(), job=job, sweep_name=name)
    # The driver function only waits on its Train run: the CPUs go to the workers and Ray Data.
    # (Tune refuses an empty request, so it asks for some memory instead of a CPU.)
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": DRIVER_MEMORY})
    reports = _reports_per_trial(plan["total_steps"], cfg.train.eval_every)
    if resume:
        tuner = tune.Tuner.restore(tune_uri, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"overrides": tune_space(cfg.sweep.space)},
            tune_config=tune.TuneConfig(
                metric=cfg.sweep.metric,
                mode=cfg.sweep.mode,
                num_samples=cfg.sweep.num_samples,
                scheduler=ASHAScheduler(
                    grace_period=min(cfg.sweep.grace_period, reports), max_t=reports, reduction_factor=2
                ),
                max_concurrent_trials=cfg.sweep.max_concurrent or _max_concurrent(cfg),
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=sweep_uri,
                # One failing trial is recorded on the leaderboard; the others go on.
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    rows = leaderboard(grid, cfg, job)
    _write_text(storage.join(sweep_uri, "leaderboard.csv"), _to_csv(rows))
    print(f"\n[sweep] {name}: {len(rows)} trials, best first by {cfg.sweep.metric} ({cfg.sweep.mode})")
    print(format_table(rows), flush=True)
    best = next((r for r in rows if _finite(r[cfg.sweep.metric])), None)
    if best is None:
        raise RuntimeError(f"sweep {name}: no trial reported {cfg.sweep.metric}; see {sweep_uri}/leaderboard.csv")
    result = next(r for r in grid if r.metrics.get("trial_id") == best["trial_id"])
    best_tree = _with_overrides(cfg.model_dump(mode="json"), result.config["overrides"])
    set_dotted(best_tree, "run.name", f"{name}-best")
    _write_text(storage.join(sweep_uri, "best.yaml"), yaml.safe_dump(best_tree, sort_keys=False))
    checkpoint_path = result.metrics.get("checkpoint_path")
    if checkpoint_path:
        fs, _ = storage.filesystem(cfg.run.storage)
        checkpoint = ray.train.Checkpoint(checkpoint_path, filesystem=fs)
        publish_result(SimpleNamespace(checkpoint=checkpoint), cfg, job, f"{name}/best")
    else:
        print(f"[sweep] best trial {best['trial_id']} left no final checkpoint: no best/model", flush=True)
    return sweep_uri


def leaderboard(grid, cfg: JobConfig, job: str) -> list[dict]:
    """One row per trial: id, status, swept values, metric, trainable_params, steps; best first."""
    rows, row_counts = [], {}
    for result in grid:
        metrics, overrides = result.metrics or {}, result.config.get("overrides", {})
        trial_cfg = build_config(_with_overrides(cfg.model_dump(), overrides))
        steps = metrics.get("step")
        if result.error is not None:
            status = "ERROR"
        else:
            key = (trial_cfg.data.train, trial_cfg.data.limit)
            rows_n = row_counts.setdefault(key, count_rows(*key))
            planned = _planned_steps(trial_cfg, rows_n)
            status = "DONE" if steps is not None and steps >= planned else "STOPPED"
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or os.path.basename(str(result.path)),
                "status": status,
                **{key: overrides.get(key) for key in cfg.sweep.space},
                cfg.sweep.metric: metrics.get(cfg.sweep.metric),
                "trainable_params": metrics.get("trainable_params"),
                "steps": steps,
            }
        )
    sign = -1 if cfg.sweep.mode == "max" else 1
    rows.sort(key=lambda r: (not _finite(r[cfg.sweep.metric]), sign * (r[cfg.sweep.metric] or 0)))
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    cells = [list(rows[0])] + [[_cell(v) for v in row.values()] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _with_overrides(base: dict, overrides: dict) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(base))  # a deep copy that also drops non-YAML types
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return tree


def _check_metric(cfg: JobConfig, job: str) -> None:
    metric = cfg.sweep.metric
    if metric in VAL_METRICS and not cfg.data.val:
        raise ConfigError(f"sweep.metric: {metric} is measured on data.val, which is not set")
    if VAL_METRICS.get(metric) not in (None, job):
        raise ConfigError(f"sweep.metric: {metric} is only reported by {VAL_METRICS[metric]} runs")


def _reports_per_trial(total_steps: int, eval_every: int) -> int:
    if not eval_every:
        return 1
    return total_steps // eval_every + (1 if total_steps % eval_every else 0)


def _planned_steps(cfg: JobConfig, rows: int) -> int:
    return cfg.train.max_steps or rows // (cfg.train.batch_size * cfg.train.workers) * cfg.train.epochs


def _max_concurrent(cfg: JobConfig) -> int:
    """Trials that fit the cluster: each needs its workers plus about one CPU for Ray Data."""
    resources = ray.cluster_resources()
    per_trial = cfg.train.workers * cfg.train.cpus_per_worker + 1
    fit = int(resources.get("CPU", 1) // per_trial)
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else resources.get("GPU", 0) > 0
    if use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // cfg.train.workers))
    return max(1, fit)


def _to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _write_text(uri: str, text: str) -> None:
    fs, path = storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())
