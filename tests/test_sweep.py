"""tune.space, tune.search and tune.sweep: search-space and scheduler checks, and real ASHA
and PBT sweeps on digits.

.venv/bin/python -m pytest -q tests/test_sweep.py
"""

from __future__ import annotations

import csv
import json
import shutil
import time

import numpy as np
import pytest
import ray
import torch
from ray import tune

from system.config import ConfigError, build_config, load_config
from system.models.artifact import read_meta
from tune.space import tune_space, validate_space


def base_tree(**space) -> dict:
    return {"sweep": {"space": space}, "model": {"name": "test_resnet", "kwargs": {}}}


def assert_cpus_given_back(ray) -> None:
    """Every trial (Train run, in-process trial, or one a scheduler stopped mid-run) gave its
    CPUs back to the 2-CPU test instance; Ray frees them a moment after a trial ends."""
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == 2


@pytest.mark.parametrize(
    "space, key, words",
    [
        ({"train.lr": {"logunifrom": [1e-4, 1e-2]}}, "train.lr", "unknown domain"),
        ({"train.lr": {"uniform": [1e-4]}}, "train.lr", "two numbers"),
        ({"train.lr": {"uniform": [1e-2, 1e-4]}}, "train.lr", "lo < hi"),
        ({"train.lr": {"loguniform": [0, 1e-2]}}, "train.lr", "lo > 0"),
        ({"finetune.rank": {"randint": [2.5, 8]}}, "finetune.rank", "integers"),
        ({"finetune.rank": {"choice": []}}, "finetune.rank", "at least one"),
        ({"train.lrr": {"loguniform": [1e-4, 1e-2]}}, "train.lrr", "unknown key"),
        ({"trian.lr": {"choice": [0.1]}}, "trian.lr", "unknown key"),
        ({"seed.value": 3}, "seed.value", "not a section"),
        ({"finetune.rank": {"choice": [4, 0]}}, "finetune.rank", "greater than or equal"),
        ({"train.lr": {"uniform": [1e-3, 20]}}, "train.lr", "less than or equal"),
        ({"run.name": {"choice": ["a", "b"]}}, "run.name", "cannot be searched"),
        ({"finetune.method": {"choice": ["lora", "dorra"]}}, "finetune.method", "unknown method 'dorra'"),
        ({"objective.name": {"grid": ["simclr", "byol2"]}}, "objective.name", "unknown objective"),
        ({"model.name": {"choice": ["test_vit", "vit_tinyy"]}}, "model.name", "unknown timm model"),
    ],
)
def test_invalid_space_names_the_key(space, key, words):
    cfg = build_config(base_tree(**space))
    with pytest.raises(ConfigError) as err:
        validate_space(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert f"sweep.space.{key}" in message
    assert words in message


def test_empty_space_is_an_error():
    with pytest.raises(ConfigError, match="sweep.space: empty"):
        validate_space(build_config(base_tree()))


def test_valid_space_becomes_tune_domains():
    space = {
        "train.lr": {"loguniform": ["1e-4", "1e-2"]},  # as YAML reads 1e-4
        "train.weight_decay": {"uniform": [0.0, 0.1]},
        "finetune.rank": {"choice": [2, 4]},
        "train.batch_size": {"grid": [16, 32]},
        "train.warmup_steps": {"randint": [0, 5]},
        "finetune.dropout": 0.1,
        "model.kwargs": {"choice": [{}, {"drop_rate": 0.1}]},
    }
    tried = validate_space(build_config(base_tree(**space)))
    assert tried["train.warmup_steps"] == [0, 4] and tried["finetune.dropout"] == [0.1]
    assert tried["train.lr"] == [1e-4, 1e-2]
    domains = tune_space(space)
    assert isinstance(domains["train.lr"], tune.search.sample.Float) and domains["train.lr"].upper == 1e-2
    assert isinstance(domains["finetune.rank"], tune.search.sample.Categorical)
    assert isinstance(domains["train.warmup_steps"], tune.search.sample.Integer)
    assert domains["train.batch_size"] == {"grid_search": [16, 32]}
    assert domains["finetune.dropout"] == 0.1


def test_sweep_is_checked_before_ray_starts(digits_data, tmp_path):
    from tune.sweep import run_sweep

    train_uri, test_uri = digits_data
    tree = {
        **base_tree(**{"train.lr": {"choice": [0.01]}}),
        "data": {"train": train_uri},
        "run": {"storage": str(tmp_path), "name": "sw"},
    }
    with pytest.raises(ConfigError, match="sweep.metric: val_acc is measured on data.val"):
        run_sweep(build_config(tree))
    tree["data"]["val"] = test_uri
    with pytest.raises(ConfigError, match="no sweep to resume"):
        run_sweep(build_config(tree), resume=True)
    (tmp_path / "sw").mkdir()
    with pytest.raises(ConfigError, match="sweep folder exists"):
        run_sweep(build_config(tree))
    with pytest.raises(ConfigError, match="--resume needs the name"):
        run_sweep(build_config({**tree, "run": {"storage": str(tmp_path)}}), resume=True)


@pytest.mark.slow
def test_quickstart_sweep_outputs(ray_local, quickstart_run):
    """The quickstart's real 2-trial ASHA sweep on digits: leaderboard, best.yaml, best model."""
    root, run = quickstart_run
    assert run.returncode == 0, run.stderr[-3000:]
    folder = root / "quickstart" / "sweep"
    with open(folder / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    columns = {"trial_id", "status", "train.lr", "finetune.rank", "val_acc", "trainable_params", "steps"}
    assert columns <= set(rows[0])
    # Finished trials rank first (best first); one ASHA stopped early would come after them.
    assert rows[0]["status"] == "DONE" and int(rows[0]["steps"]) == 22
    assert {r["status"] for r in rows} <= {"DONE", "STOPPED"}
    done = [float(r["val_acc"]) for r in rows if r["status"] == "DONE"]
    assert done == sorted(done, reverse=True)
    assert {r["finetune.rank"] for r in rows} <= {"4", "8"}
    assert all(r["trial_id"] in run.stdout for r in rows)  # the table went to the terminal too

    best = load_config(folder / "best.yaml")
    assert best.train.lr == pytest.approx(float(rows[0]["train.lr"]))
    assert best.finetune.rank == int(rows[0]["finetune.rank"])
    assert set(best.sweep.space) == {"train.lr", "finetune.rank"} and best.model.name == "test_resnet"
    meta = read_meta(str(folder / "best" / "model"))
    assert meta["metrics"]["val_acc"] == pytest.approx(float(rows[0]["val_acc"]))
    assert meta["config"]["finetune"]["rank"] == best.finetune.rank
    for row in rows:
        assert (folder / "trials" / row["trial_id"] / "metrics.jsonl").is_file()

    # Every trial gave its CPUs back, including one that ASHA may have stopped mid-run.
    assert_cpus_given_back(ray_local)


# -- search algorithms, schedulers, Pareto front (no Ray) -------------------------------


@pytest.mark.parametrize(
    "sweep, words",
    [
        ({"search": "grid", "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}, "search grid needs choice"),
        ({"search": "optuna", "space": {"train.lr": {"grid": [1e-4, 1e-2]}}}, "write choice, not grid"),
    ],
)
def test_invalid_search_is_one_line(sweep, words):
    from tune.search import check_search

    with pytest.raises(ConfigError, match=words):
        check_search(build_config({"sweep": sweep}))


@pytest.mark.parametrize("grace, first_stop", [(1, 1), (3, 3), (0.25, 5), (0.01, 1), (50, 20)])
def test_asha_grace_period_in_reports_or_as_a_share(grace, first_stop):
    """The ASHA that `repforge sweep` builds, fed a strong and a weak trial of 20 reports: the
    weak one is first stopped at the grace period (0.25: a quarter of the reports)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tune.search import build_scheduler

    asha = build_scheduler(build_config({"sweep": {"grace_period": grace}}), 20)
    strong, weak = (Trial("sweep_trial", trial_id=name, stub=True) for name in ("strong", "weak"))
    for trial in (strong, weak):
        asha.on_trial_add(None, trial)
    for report in range(1, 21):
        asha.on_trial_result(None, strong, {"training_iteration": report, "val_acc": 0.9})
    actions = [
        asha.on_trial_result(None, weak, {"training_iteration": report, "val_acc": 0.1})
        for report in range(1, 21)
    ]
    assert actions.index(TrialScheduler.STOP) + 1 == first_stop


@pytest.mark.parametrize("brackets, first_stops", [(1, {1}), (2, {1, 2})])
def test_asha_brackets_hedge_with_later_first_rungs(brackets, first_stops):
    """With 2 brackets (reduction factor 2), some weak trials are first judged at report 2, not 1.
    Ray assigns each trial a bracket with numpy's global generator, seeded here."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tune.search import build_scheduler

    np.random.seed(0)
    asha = build_scheduler(build_config({"sweep": {"brackets": brackets}}), 8)
    stops = set()
    for index in range(20):  # strong and weak in turn: each bracket has strong trials to judge by
        trial = Trial("sweep_trial", trial_id=f"t{index}", stub=True)
        asha.on_trial_add(None, trial)
        value = 0.9 if index % 2 == 0 else 0.1
        actions = [
            asha.on_trial_result(None, trial, {"training_iteration": report, "val_acc": value})
            for report in range(1, 9)
        ]
        if TrialScheduler.STOP in actions:
            stops.add(actions.index(TrialScheduler.STOP) + 1)
    assert stops == first_stops


@pytest.mark.parametrize("grace, words", [(0, "greater than 0"), (2.5, "a whole number of reports")])
def test_asha_grace_period_is_whole_reports_or_a_share(grace, words):
    with pytest.raises(ConfigError, match=words):
        build_config({"sweep": {"grace_period": grace}})


def pbt_tree(**sweep) -> dict:
    """A valid PBT sweep (a checkpoint at every second report, where it exploits), changed by `sweep`."""
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.name": "test_resnet"}  # fixed: allowed
    return {
        "train": {"eval_every": 4, "checkpoint_every": 8},
        "sweep": {"scheduler": "pbt", "perturbation_interval": 2, "space": space, **sweep},
    }


def mutating(key: str, domain: dict) -> tuple[dict, str]:
    return {"space": {key: domain}}, f"sweep.space.{key}"


@pytest.mark.parametrize(
    "change, key, words",
    [
        ({"search": "grid"}, "sweep.search", "grid cannot drive pbt"),
        ({"search": "optuna"}, "sweep.search", "optuna cannot drive pbt"),
        (*mutating("train.lr", {"grid": [1e-3, 1e-2]}), "not grid"),
        (*mutating("model.name", {"choice": ["resnet18", "vit"]}), "mid-run"),
        (*mutating("finetune.rank", {"choice": [4, 8]}), "mid-run"),
        (*mutating("finetune.method", {"choice": ["lora", "dora"]}), "mid-run"),
        (*mutating("train.weight_decay", {"choice": [0.0, 0.05]}), "to or from 0"),
        (*mutating("finetune.head_lr_scale", {"uniform": [1, 10]}), "to or from 1"),
        ({"space": {"train.lr": 0.01}}, "sweep.space", "at least one key with a domain"),
        ({"num_samples": 1}, "sweep.num_samples", "at least 2"),
        ({"perturbation_interval": 3}, "train.checkpoint_every", "set it to 12"),
    ],
)
def test_pbt_refuses_what_it_cannot_run(change, key, words):
    from tune.search import check_search

    check_search(build_config(pbt_tree()))  # the base case is valid
    with pytest.raises(ConfigError) as err:
        check_search(build_config(pbt_tree(**change)))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{key}:") and words in message, message


def test_sweeps_refuse_the_closed_form_linear_probe():
    from tune.search import check_search

    tree = {"finetune": {"method": "linear", "closed_form": True}, "sweep": {"space": {}}}
    with pytest.raises(ConfigError, match="^finetune.closed_form: sweeps train by SGD"):
        check_search(build_config(tree))


@pytest.mark.parametrize(
    "train, key",
    [({"eval_every": 0}, "train.eval_every"), ({"checkpoint_every": 0}, "train.checkpoint_every")],
)
def test_pbt_needs_reports_and_checkpoints(train, key):
    from tune.search import check_search

    tree = pbt_tree()
    tree["train"].update(train)
    with pytest.raises(ConfigError, match=f"^{key}: pbt"):
        check_search(build_config(tree))


@pytest.mark.parametrize(
    "space, key",
    [
        ("{model.name: {choice: [test_resnet, resnet18]}}", "sweep.space.model.name"),
        ("{train.lr: {grid: [0.001, 0.01]}}", "sweep.space.train.lr"),
    ],
)
def test_pbt_config_error_exits_2_before_anything_runs(space, key, capsys, tmp_path):
    from repforge.cli import main

    sets = ["data.train=/nonexistent", "sweep.scheduler=pbt", f"sweep.space={space}"]
    sets += ["train.eval_every=4", "train.checkpoint_every=8", f"run.storage={tmp_path}"]
    assert main(["sweep", *(arg for value in sets for arg in ("--set", value))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"repforge: error: {key}: pbt"), lines
    assert not list(tmp_path.iterdir())  # nothing written (and data.train, missing, never read)


def test_pbt_mutates_the_space_within_its_ranges():
    from ray.tune.schedulers import PopulationBasedTraining

    from tune.search import _ranges, _within_ranges, build_scheduler, pbt_mutations

    space = {
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "train.warmup_steps": {"randint": [0, 10]},
        "finetune.dropout": {"choice": [0.0, 0.1, 0.2]},
        "seed": 3,
    }
    assert isinstance(build_scheduler(build_config(pbt_tree(space=space)), 3), PopulationBasedTraining)
    mutations = pbt_mutations(space)
    assert set(mutations) == {"train.lr", "train.warmup_steps", "finetune.dropout"}
    assert mutations["finetune.dropout"] == [0.0, 0.1, 0.2]  # a list: PBT moves along it
    assert isinstance(mutations["train.lr"], tune.search.sample.Float)
    # PBT's x1.2 / x0.8 may leave a range: the value is put back at its bound.
    config = {"overrides": {"train.lr": 1.2e-2, "train.warmup_steps": 11, "finetune.dropout": 0.2, "seed": 3}}
    clipped = _within_ranges(config, _ranges(space))["overrides"]
    assert clipped == {"train.lr": 1e-2, "train.warmup_steps": 9, "finetune.dropout": 0.2, "seed": 3}


def test_pareto_front_keeps_only_undominated_finished_trials():
    from tune.report import pareto_front

    rows = [
        {"trial_id": "a", "status": "DONE", "val_acc": 0.80, "trainable_params": 1000},
        {"trial_id": "b", "status": "DONE", "val_acc": 0.70, "trainable_params": 100},
        {"trial_id": "c", "status": "DONE", "val_acc": 0.60, "trainable_params": 500},  # dominated by b
        {"trial_id": "d", "status": "DONE", "val_acc": 0.85, "trainable_params": 5000},
        {"trial_id": "e", "status": "STOPPED", "val_acc": 0.99, "trainable_params": 10},  # not comparable
        {"trial_id": "f", "status": "ERROR", "val_acc": None, "trainable_params": None},
    ]
    assert [r["trial_id"] for r in pareto_front(rows, "val_acc", "max")] == ["b", "a", "d"]


def test_planned_steps_count_gradient_accumulation_as_training_does():
    # A trial that ran its whole plan must not be listed as STOPPED by ASHA.
    from system.train import planned_steps

    cfg = build_config({"train": {"batch_size": 16, "workers": 2, "accumulation_steps": 4, "epochs": 3}})
    assert planned_steps(cfg, rows=1000) == 1000 // (16 * 2 * 4) * 3
    cfg = build_config({"train": {"max_steps": 7, "accumulation_steps": 4}})
    assert planned_steps(cfg, rows=1000) == 7


def test_a_metric_the_runs_do_not_report_is_one_config_line():
    # Tune's own message when sweep.metric=val_acx (a typo), shortened from a real run.
    from tune.sweep import _unreported_metric

    tune_message = (
        "ValueError: Trial returned a result which did not include the specified metric(s) `val_acx` "
        "that `AsyncHyperBandScheduler` expects. Make sure your calls to `tune.report()` include the "
        "metric. Result: {'step': 6, 'loss': 2.29, 'total_steps': 6, 'val_acc': 0.10, "
        "'timestamp': 1795435786, 'trial_id': '9ecbc_00000', 'config/overrides/train.lr': 0.0043}"
    )
    error = _unreported_metric(tune.TuneError(tune_message), "val_acx")
    assert isinstance(error, ConfigError)
    assert (
        str(error)
        == "sweep.metric: the runs report no 'val_acx' (they report: step, loss, total_steps, val_acc)"
    )
    assert _unreported_metric(tune.TuneError("a trial's worker died"), "val_acc") is None


def test_spectrum_prior_proposes_a_rank_per_target():
    from tune.ranks import spectrum_prior

    cfg = build_config({"model": {"name": "test_resnet"}})
    low, high = spectrum_prior(cfg, 0.5), spectrum_prior(cfg, 0.99)
    assert set(low) == set(high) and len(low) >= 4
    assert all(1 <= low[k] <= high[k] for k in low) and sum(low.values()) < sum(high.values())
    # The prior is a valid rank_pattern: LoRA gets exactly those ranks.
    from system.adapters.registry import count_parameters, get_adapter
    from system.models.artifact import create_backbone

    cfg = build_config({"model": {"name": "test_resnet"}, "finetune": {"rank_pattern": low}})
    lora = get_adapter("lora").apply(create_backbone("test_resnet"), cfg.finetune)
    convs = {n: m for n, m in create_backbone("test_resnet").named_modules() if n.replace(".", r"\.") in low}
    expected = sum(
        low[n.replace(".", r"\.")] * (m.weight[0].numel() + m.out_channels) for n, m in convs.items()
    )
    assert count_parameters(lora)[0] == expected


def test_max_concurrent_above_what_fits_warns(ray_local, capsys):
    from tune.sweep import _concurrency

    # The session's instance has 2 CPUs; a trial of 2 workers x 0.5 CPU + 1 for Ray Data fits once.
    tree = {"train": {"workers": 2, "cpus_per_worker": 0.5}}
    assert _concurrency(build_config(tree)) == 1
    assert "warning" not in capsys.readouterr().err
    assert _concurrency(build_config({**tree, "sweep": {"max_concurrent": 3}})) == 3
    assert "sweep.max_concurrent=3, but the cluster fits 1 trial(s)" in capsys.readouterr().err


# -- a real ASHA sweep on digits: interrupted, resumed, finished -----------------------------


def sweep_tree(train: str, val: str, storage) -> dict:
    return {
        "data": {"train": train, "val": val, "image_size": 32},
        "model": {"name": "test_resnet", "kwargs": {}},
        "finetune": {"method": "full"},
        "train": {"workers": 1, "cpus_per_worker": 0.5, "batch_size": 32, "max_steps": 12, "eval_every": 4},
        "run": {"storage": str(storage), "name": "asha"},
        "sweep": {
            "num_samples": 1,
            # One trial at a time (two side by side starve each other's input pipeline on 2
            # CPUs), in grid order: lr 1e-2 sets the rung, which lr 1e-8 then meets.
            "max_concurrent": 1,
            # One rung, at the second report (step 8), on the training loss (val_acc after 12
            # steps from random init is near chance for every trial: ties). On digits, lr 1e-2
            # has the loss near 1.3-1.7 by then while 1e-7 and 1e-8 stay near 2.4 (measured
            # in-process over two seeds); step 4 is still noise.
            "grace_period": 2,
            "metric": "loss",
            "mode": "min",
            "space": {"train.lr": {"grid": [1e-2, 1e-8]}},
        },
    }


@pytest.mark.slow
# The Ray Train variant takes 1.5 min on 2 cores: make test-long (the 20-minute budget of make test).
@pytest.mark.parametrize(
    "in_process",
    [pytest.param(False, marks=pytest.mark.long), True],
    ids=["train-runs", "in-process"],
)
def test_asha_sweep_interrupted_resumed_and_reported(ray_local, digits_data, tmp_path, in_process):
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from tune.sweep import run_sweep

    tree = sweep_tree(*digits_data, tmp_path)
    tree["sweep"]["in_process"] = in_process
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(tree))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "repforge", "sweep", "--config", str(tmp_path / "sweep.yaml")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    folder = tmp_path / "asha"
    deadline = time.monotonic() + 600
    while not list(folder.glob("_tune/sweep_trial*")) and time.monotonic() < deadline:
        time.sleep(1)
    first.send_signal(signal.SIGINT)  # Ctrl+C once Tune has started trials
    output, _ = first.communicate(timeout=600)
    assert first.returncode != 0 and "--resume" in output, output[-3000:]
    assert not (folder / "leaderboard.csv").exists()

    run_sweep(build_config(tree), resume=True)
    with open(folder / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    # (ERROR is allowed: one failing trial is a row, and does not stop the sweep.)
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"DONE", "STOPPED", "ERROR"}, rows
    assert "STOPPED" in {r["status"] for r in rows}, rows  # ASHA stopped at least one early
    assert rows[0]["status"] == "DONE" and float(rows[0]["train.lr"]) >= 1e-3
    with open(folder / "pareto.csv") as f:
        front = list(csv.DictReader(f))
    assert front and {r["trial_id"] for r in front} <= {r["trial_id"] for r in rows if r["status"] == "DONE"}
    assert (folder / "pareto.png").stat().st_size > 1000
    best = load_config(folder / "best.yaml")
    assert best.train.lr == pytest.approx(float(rows[0]["train.lr"]))
    assert read_meta(str(folder / "best" / "model"))["metrics"]["loss"] == pytest.approx(
        float(rows[0]["loss"])
    )
    # Resumed with another budget, it would mix two sweeps: refused, and nothing is rewritten.
    bigger = build_config({**tree, "sweep": {**tree["sweep"], "num_samples": 3}})
    with pytest.raises(ConfigError, match=r"sweep.num_samples: 1 -> 3"):
        run_sweep(bigger, resume=True)
    with open(folder / "leaderboard.csv") as f:
        assert list(csv.DictReader(f)) == rows
    # The Train runs (or in-process trials) that ASHA stopped gave their CPUs back.
    assert_cpus_given_back(ray_local)


# -- the same sweep with in-process trials: no Ray Train run per trial ---------------------


@pytest.mark.slow
def test_in_process_trials_train_as_train_runs_do(ray_local, digits_data, tmp_path):
    import json

    from system.train import run_training
    from tune.sweep import run_sweep

    tree = sweep_tree(*digits_data, tmp_path)
    tree["sweep"]["in_process"] = True
    run_sweep(build_config(tree))
    folder = tmp_path / "asha"
    with open(folder / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["status"], float(r["train.lr"]), r["steps"]) for r in rows] == [
        ("DONE", 1e-2, "12"),
        ("STOPPED", 1e-8, "8"),  # stopped at its rung; its loop returned at once (the CPUs below)
    ], rows
    assert read_meta(str(folder / "best" / "model"))["metrics"]["loss"] == pytest.approx(
        float(rows[0]["loss"])
    )

    # The same loop on the same data as a Ray Train run of that config: the same losses.
    reference = build_config(
        {**tree, "train": {**tree["train"], "lr": 1e-2}, "run": {**tree["run"], "name": "ref"}}
    )
    run_training(reference, "finetune")

    def losses(path):
        return [json.loads(line)["loss"] for line in path.read_text().splitlines()]

    in_process = losses(folder / "trials" / rows[0]["trial_id"] / "metrics.jsonl")
    assert in_process == pytest.approx(losses(tmp_path / "ref" / "metrics.jsonl"), rel=1e-4)
    assert len(in_process) == 3 and in_process[-1] < 0.8 * in_process[0]  # it trained
    assert_cpus_given_back(ray_local)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"train": {"workers": 2}}, "set train.workers 1"),
        ({"sweep": {"space": {"train.workers": {"choice": [1, 2]}}}}, "set train.workers 1"),
        (
            {"train": {"eval_every": 4, "checkpoint_every": 8}, "sweep": {"scheduler": "pbt"}},
            "use asha or fifo",
        ),
    ],
)
def test_in_process_refuses_what_it_cannot_run(change, words):
    from tune.search import check_search

    tree = {
        "train": {"workers": 1},
        "sweep": {"in_process": True, "space": {"train.lr": {"choice": [0.1, 0.01]}}},
    }
    check_search(build_config(tree))  # the base case is valid
    for section, values in change.items():
        tree[section] = {**tree[section], **values}
    with pytest.raises(ConfigError, match=f"^sweep.in_process: .*{words}"):
        check_search(build_config(tree))


# -- a real PBT sweep on digits: the weak trial goes on from the strong one's checkpoint ------


# 3-4 minutes here (two Train runs at once, then one to three restarts from checkpoints):
# over make test's budget, so it runs with `make test-long`.
@pytest.mark.long
def test_pbt_sweep_hands_checkpoints_over_with_the_mutated_lr(ray_local, digits_data, tmp_path):
    """Two trials side by side, one report (and checkpoint) every 4 of 24 steps; PBT compares
    them at every report, so from its second report on the weak one clones the strong one
    (same init and data order: the lr alone ranks them, at every step). The steps take a
    fraction of a second here: with 12, the strong trial was sometimes at its end when PBT
    took its checkpoint, and the clone, with no steps left, reported nothing.

    Every report's lr is checked against the config in force when it was made: with a warmup
    over the whole run, lr = peak lr x min(1, (step + 1) / 24), never 0. A Train run that took
    the checkpoint's optimizer and schedule, not the mutated lr, would report the other's lr.
    """
    import pandas as pd

    from tune.sweep import run_sweep

    tree = {
        "seed": 9,  # samples the first population: lr 5.5e-3 and 1.7e-5, a clear strong and weak
        # No data.val, no shuffle, few rows: each Train run starts as fast as it can (startup,
        # not the 24 steps, is what a trial costs here).
        "data": {"train": digits_data[0], "image_size": 32, "shuffle": "none", "limit": 512},
        "model": {"name": "test_resnet", "kwargs": {}},
        "finetune": {"method": "full"},
        "train": {
            **{"workers": 1, "cpus_per_worker": 0.5, "batch_size": 32, "max_steps": 24},
            **{"eval_every": 4, "checkpoint_every": 4, "warmup_steps": 24},
        },
        "run": {"storage": str(tmp_path), "name": "pbt"},
        "sweep": {
            **{"scheduler": "pbt", "num_samples": 2, "max_concurrent": 2, "perturbation_interval": 1},
            **{"metric": "loss", "mode": "min", "space": {"train.lr": {"loguniform": [1e-6, 2e-2]}}},
        },
    }
    run_sweep(build_config(tree))
    folder = tmp_path / "pbt"
    # What Tune saw: every report of every trial, before and after each restart, in order.
    frames = tune.ExperimentAnalysis(str(folder / "_tune")).trial_dataframes.values()
    reports = pd.concat(frames).to_dict("records")
    peak = "config/overrides/train.lr"
    for r in reports:
        assert r["lr"] == pytest.approx(r[peak] * min(1, (r["step"] + 1) / 24)), r
    trials = {r["trial_id"]: [x for x in reports if x["trial_id"] == r["trial_id"]] for r in reports}

    def first_peak(trial: str) -> float:
        """The peak lr a trial started with. Not from Tune's record: when PBT clones another
        trial at a trial's first reports, Tune's record of that trial can lack them (seen on
        Ray 2.60); trials/<id>/metrics.jsonl has every report of every Train run."""
        first = json.loads((folder / "trials" / trial / "metrics.jsonl").read_text().splitlines()[0])
        return first["lr"] / min(1, (first["step"] + 1) / 24)

    weak, strong = sorted(first_peak(trial) for trial in trials)
    assert strong > 100 * weak, "seed 9 no longer samples a strong and a weak lr"

    handovers = []  # a trial's first report after it went on from another trial's checkpoint
    for trial, rows in trials.items():
        before = ""
        for r in rows:
            if r["started_from"] not in ("", trial, before):
                handovers.append((trial, r, trials[r["started_from"]]))
            before = r["started_from"]
    assert handovers, "no trial went on from another trial's checkpoint"
    for trial, r, source in handovers:
        # It went on from a step the other trial had reported (with a checkpoint), not step 0,
        # and Tune's count of reports went on from there too.
        assert r["step"] > 4 and r["step"] - 4 in {x["step"] for x in source}, (r, source)
        assert r["training_iteration"] == r["step"] // 4
        # With the mutated lr: neither its own first lr, nor the other trial's at that step.
        source_peak = next(x[peak] for x in source if x["step"] == r["step"] - 4)
        assert r[peak] != pytest.approx(first_peak(trial)) and r[peak] != pytest.approx(source_peak)
    assert (folder / "_tune" / "pbt_global.txt").read_text().count("\n") >= len(handovers)

    with open(folder / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "DONE" and r["steps"] == "24" for r in rows), rows
    best = load_config(folder / "best.yaml")
    assert best.train.lr == pytest.approx(float(rows[0]["train.lr"]))
    best_loss = read_meta(str(folder / "best" / "model"))["metrics"]["loss"]
    assert best_loss == pytest.approx(float(rows[0]["loss"]))
    # The runs that PBT stopped (to clone, or to pause) gave their CPUs back.
    assert_cpus_given_back(ray_local)


class KeepingWorker:
    """`run_loop`'s worker interface (TrainWorker in system/train.py) in this process, on
    the CPU: it keeps every report and a copy of every checkpoint folder."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, datasets: dict, folder):
        self.datasets, self.folder, self.reports = datasets, folder, []

    def checkpoint(self):
        return None

    def shard(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, folder: str | None = None) -> None:
        kept = None
        if folder:  # run_loop deletes it once this returns
            kept = self.folder / f"checkpoint-{len(self.reports)}"
            shutil.copytree(folder, kept)
        self.reports.append((metrics, kept))

    def stop_requested(self) -> bool:
        return False


def test_a_run_handed_a_final_checkpoint_reports_that_model(ray_local, digits_data, tmp_path):
    """What a PBT trial cloned from another trial's final checkpoint does: no steps are left,
    and it reports once, that model's metrics with its own (mutated) lr, and its artifacts."""
    from system.train import input_datasets, loop_config, plan_run, run_loop

    def run(lr: float, name: str, start_from=None) -> KeepingWorker:
        tree = {
            "data": {"train": digits_data[0], "val": digits_data[1], "image_size": 32, "limit": 256},
            "model": {"name": "test_resnet", "kwargs": {}},
            "finetune": {"method": "full"},
            "train": {
                **{"workers": 1, "batch_size": 32, "max_steps": 8, "lr": lr},
                # Warmup over the whole run: the last step's lr is the peak lr, this run's own.
                **{"eval_every": 4, "checkpoint_every": 8, "warmup_steps": 8},
            },
            "run": {"storage": str(tmp_path), "name": name},
        }
        cfg = build_config(tree)
        plan = plan_run(cfg, "finetune")
        worker = KeepingWorker(
            input_datasets(cfg, "finetune", plan["meta"]["preprocessing"]), tmp_path / name
        )
        run_loop(loop_config(cfg, "finetune", plan, start_from), worker)
        return worker

    source = run(1e-2, "source")
    assert [m["step"] for m, _ in source.reports] == [4, 8]
    final, folder = source.reports[-1]
    clone = run(3e-3, "clone", start_from=ray.train.Checkpoint.from_directory(str(folder)))
    assert len(clone.reports) == 1, "a run with no steps left must report once"
    metrics, kept = clone.reports[0]
    assert metrics["step"] == 8 and metrics["lr"] == pytest.approx(3e-3)
    # The same model on the same data: the source's results, evaluated again.
    for key in ("val_acc", "knn_acc", "rankme", "loss"):
        assert metrics[key] == pytest.approx(final[key], rel=1e-5), key
    assert read_meta(str(kept / "model"))["metrics"]["val_acc"] == pytest.approx(final["val_acc"])


def test_invalid_space_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "repforge",
        "sweep",
        "--set",
        "data.train=x",
        "--set",
        "model.name=test_resnet",
    ]
    cmd += ["--set", "sweep.space.train.lr={loguniform: [0, 0.1]}", "--set", f"run.storage={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "sweep.space.train.lr" in done.stderr


@pytest.mark.parametrize("search", ["optuna", "optuna_mo"])
def test_optuna_searchers_drive_tune(ray_local, search, tmp_path):
    """The searcher and scheduler run_sweep builds, on a cheap function trainable (no Train run)."""
    from tune.search import build_scheduler, build_searcher

    space = {"train.lr": {"loguniform": [1e-4, 1e-1]}, "finetune.rank": {"choice": [2, 4, 8]}}
    cfg = build_config({"sweep": {"search": search, "num_samples": 6, "space": space}})
    validate_space(cfg)

    def trainable(config):
        lr, rank = config["overrides"]["train.lr"], config["overrides"]["finetune.rank"]
        for step in range(1, 3):
            tune.report({"val_acc": step * (1 - abs(lr - 0.01)), "trainable_params": 100 * rank})

    domains = tune_space(cfg.sweep.space)
    tuner = tune.Tuner(
        trainable,
        param_space={"overrides": domains},
        tune_config=tune.TuneConfig(
            num_samples=6,
            scheduler=build_scheduler(cfg, 2),
            search_alg=build_searcher(cfg, max_concurrent=2),
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    assert len(results) == 6 and not results.errors
    assert len({r.config["overrides"]["train.lr"] for r in results}) == 6  # Optuna proposed each trial


@pytest.mark.slow
def test_optuna_mo_sweep_trades_the_metric_against_trainable_params(ray_local, digits_data, tmp_path):
    """A real optuna_mo sweep (in-process trials on digits) over methods from the head alone
    (linear) through the norm layers to every weight (full): more trainable parameters buy
    accuracy, so the Pareto front holds several trials, and no trial dominates one on it. The
    searcher's own Optuna study was told both objectives of every trial (Ray's OptunaSearch
    only logs a warning when a result lacks one): its Pareto front is the same."""
    from ray.tune.search.optuna import OptunaSearch

    from tune.sweep import run_sweep

    tree = sweep_tree(*digits_data, tmp_path)
    tree["run"]["name"] = "mo"
    tree["train"].update(lr=1e-2, eval_every=12)  # one report, at the end, with val_acc
    tree["sweep"] = {
        "search": "optuna_mo",
        "scheduler": "fifo",
        "in_process": True,
        "num_samples": 5,
        "max_concurrent": 1,
        "metric": "val_acc",
        "mode": "max",
        "space": {"finetune.method": {"choice": ["linear", "norm", "full"]}},
    }
    run_sweep(build_config(tree))
    folder = tmp_path / "mo"
    with open(folder / "leaderboard.csv") as f:
        rows = [
            {**r, "val_acc": float(r["val_acc"]), "trainable_params": int(r["trainable_params"])}
            for r in csv.DictReader(f)
        ]
    assert len(rows) == 5 and {r["status"] for r in rows} == {"DONE"}, rows
    with open(folder / "pareto.csv") as f:
        front = {r["trial_id"] for r in csv.DictReader(f)}
    on_front = [r for r in rows if r["trial_id"] in front]
    assert len(on_front) > 1, rows  # a trade-off: the cheapest trial is not also the best

    def point(row: dict) -> tuple[float, int]:
        return row["val_acc"], row["trainable_params"]

    def dominates(a: dict, b: dict) -> bool:
        (metric_a, params_a), (metric_b, params_b) = point(a), point(b)
        return metric_a >= metric_b and params_a <= params_b and point(a) != point(b)

    for row in on_front:
        assert not any(dominates(other, row) for other in rows), (row, rows)
    # ...and every trial off the front is dominated by one on it (or ties with one).
    for row in rows:
        assert row in on_front or any(dominates(p, row) or point(p) == point(row) for p in on_front)
    assert len({r["finetune.method"] for r in on_front}) == len(on_front)

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(folder / "_tune"))
    study = searcher._ot_study  # the study the searcher proposed trials from
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    told = [t.values for t in study.trials]
    assert len(told) == 5 and all(v is not None and len(v) == 2 for v in told), told
    assert {tuple(t.values) for t in study.best_trials} == {point(p) for p in on_front}
