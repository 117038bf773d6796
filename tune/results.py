"""What a finished sweep leaves in its folder `{run.storage}/{run.name}/`, from Tune's ResultGrid:
`leaderboard.csv` (also printed as a table), `pareto.csv` + `pareto.png` (the metric against
trainable parameters), `best.yaml` and the best trial's `best/model` (and `best/adapter`).
tune/sweep.py runs the sweep and calls `write_results`; tune/report.py has the plain
functions over leaderboard rows.

    .venv/bin/python -m pytest -q tests/test_sweep.py -k "asha_sweep or optuna_mo"
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import yaml

from system import storage
from system.config import ConfigError, JobConfig, build_config, set_dotted
from system.data.dataset import count_rows
from system.train import planned_steps
from system.train.export import publish_result
from system.train.runs import format_table
from tune.report import finite, pareto_front, pareto_png, sort_rows, to_csv


def write_results(grid, cfg: JobConfig, job: str, name: str, sweep_uri: str) -> None:
    """The leaderboard, the Pareto front, best.yaml and the best trial's model, from a finished
    sweep's ResultGrid. Raises when no trial reported the metric."""
    rows = leaderboard(grid, cfg, job)
    storage.write_text(storage.join(sweep_uri, "leaderboard.csv"), to_csv(rows))
    print(f"\n[sweep] {name}: {len(rows)} trials, best first by {cfg.sweep.metric} ({cfg.sweep.mode})")
    table = format_table(rows, missing="-", rule=True, justify=str.ljust) if rows else "(no trials)"
    print(table, flush=True)
    write_pareto(rows, cfg, sweep_uri)
    best = next((r for r in rows if finite(r[cfg.sweep.metric]) and r["status"] != "ERROR"), None)
    if best is None and all(r["status"] == "ERROR" for r in rows):
        raise RuntimeError(f"sweep {name}: every trial failed (see the leaderboard and logs in {sweep_uri})")
    if best is None:
        # Trials ran but none reported it: a sweep.metric no run reports (a typo), a config error.
        raise ConfigError(
            f"sweep.metric: no trial of sweep {name} reported {cfg.sweep.metric} (see {sweep_uri})"
        )
    result = next(r for r in grid if trial_id(r) == best["trial_id"])
    best_tree = with_overrides(cfg.model_dump(mode="json"), result.config["overrides"])
    set_dotted(best_tree, "run.name", f"{name}-best")
    storage.write_text(storage.join(sweep_uri, "best.yaml"), yaml.safe_dump(best_tree, sort_keys=False))
    checkpoint, published = last_checkpoint(result, cfg), {}
    if checkpoint is not None:
        published = publish_result(SimpleNamespace(checkpoint=checkpoint), cfg, job, f"{name}/best")
    if "model" not in published:  # stopped before its end, or a run's last checkpoint, not its final one
        print(f"[sweep] best trial {best['trial_id']} left no final checkpoint: no best/model", flush=True)


def last_checkpoint(result, cfg: JobConfig):
    """The trial's last checkpoint: its Train run's (whose path its reports carry), or for an
    in-process trial, the last one it reported to Tune."""
    checkpoint_path = result.metrics.get("checkpoint_path")
    if checkpoint_path:
        import ray.train

        fs, _ = storage.filesystem(cfg.run.storage)
        return ray.train.Checkpoint(checkpoint_path, filesystem=fs)
    return result.checkpoint


def leaderboard(grid, cfg: JobConfig, job: str) -> list[dict]:
    """One row per trial: id, status, swept values, metric, trainable_params, steps; best first."""
    rows, row_counts = [], {}
    for result in grid:
        if result.config is None:  # a trial that never started (interrupted before it ran)
            continue
        metrics, overrides = result.metrics or {}, result.config.get("overrides", {})
        trial_cfg = build_config(with_overrides(cfg.model_dump(), overrides))
        steps = metrics.get("step")
        if result.error is not None:
            status = "ERROR"
        else:
            # The trial's own plan (train.max_minutes can shorten it); counted again for
            # trials that reported no total_steps (a sweep started by an older version).
            planned = metrics.get("total_steps")
            if planned is None:
                key = (trial_cfg.data.train, trial_cfg.data.limit)
                if key not in row_counts:
                    row_counts[key] = count_rows(*key)
                planned = planned_steps(trial_cfg, row_counts[key])
            status = "DONE" if steps is not None and steps >= planned else "STOPPED"
        rows.append(
            {
                "trial_id": trial_id(result),
                "status": status,
                **{key: overrides.get(key) for key in cfg.sweep.space},
                cfg.sweep.metric: metrics.get(cfg.sweep.metric),
                "trainable_params": metrics.get("trainable_params"),
                "steps": steps,
            }
        )
    # Finished trials first: a stopped trial's metric comes from fewer steps, and it left no model.
    return sort_rows(rows, cfg.sweep.metric, cfg.sweep.mode)


def write_pareto(rows: list[dict], cfg: JobConfig, sweep_uri: str) -> list[dict]:
    """pareto.csv and pareto.png: the trials no other beats on both metric and trainable params."""
    front = pareto_front(rows, cfg.sweep.metric, cfg.sweep.mode)
    storage.write_text(storage.join(sweep_uri, "pareto.csv"), to_csv(front))
    with tempfile.TemporaryDirectory() as tmp:
        pareto_png(rows, front, cfg.sweep.metric, f"{tmp}/pareto.png")
        storage.write_bytes(storage.join(sweep_uri, "pareto.png"), Path(f"{tmp}/pareto.png").read_bytes())
    print(f"[sweep] Pareto front ({cfg.sweep.metric} vs trainable params): {len(front)} trials", flush=True)
    return front


def trial_id(result) -> str:
    """From the last report, or for a trial that never reported, from its folder's name."""
    if result.metrics and result.metrics.get("trial_id"):
        return result.metrics["trial_id"]
    return trial_id_in(str(result.path))


def trial_id_in(path: str) -> str:
    """The trial id in a Tune trial folder's name (e.g. sweep_trial_1a2b3_00001_1_train.lr=...)."""
    name = os.path.basename(path)
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", name)
    return match.group(1) if match else name


def with_overrides(base: dict, overrides: dict) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(base))  # a deep copy that also drops non-YAML types
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return tree
