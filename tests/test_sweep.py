"""tune.space and tune.sweep: search-space validation, and a real 2-trial sweep on digits.

.venv/bin/python -m pytest -q tests/test_sweep.py
"""

from __future__ import annotations

import csv
import time

import pytest
from ray import tune

from system.config import ConfigError, build_config, load_config
from system.models import read_meta
from tune.space import tune_space, validate_space


def base_tree(**space) -> dict:
    return {"sweep": {"space": space}, "model": {"name": "test_resnet", "kwargs": {}}}


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
    assert rows[0]["status"] == "DONE" and int(rows[0]["steps"]) == 33
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
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert ray_local.available_resources().get("CPU", 0) == 2
