"""The closed-form linear probe (finetune.method=linear, finetune.closed_form=true).

.venv/bin/python -m pytest -q tests/test_linear_probe.py

The solver is checked against scikit-learn's Ridge, the streaming statistics against
one pass over all rows, and the whole job on real digits through the CLI's code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from system import storage
from system.config import ConfigError, load_config
from system.train.linear_probe import RidgeStats, pick_ridge, solve_head

ROOT = Path(__file__).resolve().parents[1]


def separable_problem(n=600, d=24, classes=5, seed=0):
    """Random features with labels a noisy linear function of them, off-centre and badly scaled."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d) * 5
    labels = (x @ rng.normal(size=(d, classes)) + rng.normal(size=(n, classes))).argmax(-1)
    return x.astype(np.float32), labels


def test_closed_form_head_equals_sklearn_ridge_and_streaming_equals_one_shot():
    from sklearn.linear_model import Ridge

    x, labels = separable_problem()
    classes = 5
    one_shot = RidgeStats(x.shape[1], classes)
    one_shot.add(x, labels)
    streamed = RidgeStats(x.shape[1], classes)
    for part in np.array_split(np.arange(len(x)), 7):  # uneven batches
        streamed.add(x[part], labels[part])
    onehot = np.eye(classes)[labels]
    centred = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    for ridge in (1e-4, 1e-2, 1.0):
        weight, bias = solve_head(streamed, ridge)
        alpha = ridge * (centred**2).sum() / x.shape[1]  # ridge x n x mean feature variance
        reference = Ridge(alpha=alpha, fit_intercept=True, solver="cholesky").fit(
            x.astype(np.float64), onehot
        )
        assert np.allclose(weight, reference.coef_, atol=1e-4, rtol=1e-4), ridge
        assert np.allclose(bias, reference.intercept_, atol=1e-4, rtol=1e-4), ridge
        one_weight, one_bias = solve_head(one_shot, ridge)
        assert np.allclose(weight, one_weight, atol=1e-8) and np.allclose(bias, one_bias, atol=1e-8)
    # A separable-enough problem: the head classifies its own training data well.
    weight, bias = solve_head(streamed, 1e-4)
    assert ((x @ weight.T + bias).argmax(-1) == labels).mean() > 0.8


def test_ridge_is_picked_on_validation_accuracy():
    x, labels = separable_problem(n=800)
    stats = RidgeStats(x.shape[1], 5)
    stats.add(x[:500], labels[:500])
    val = (x[500:], labels[500:])
    ridge, weight, bias, scores = pick_ridge(stats, [1e-4, 1e-2, 1e3], val)
    assert set(scores) == {1e-4, 1e-2, 1e3}
    assert scores[ridge] == max(scores.values())
    for each in scores:  # each score is that ridge's head's accuracy on val
        each_weight, each_bias = solve_head(stats, each)
        assert ((val[0] @ each_weight.T + each_bias).argmax(-1) == val[1]).mean() == pytest.approx(
            scores[each]
        )
    assert ((val[0] @ weight.T + bias).argmax(-1) == val[1]).mean() == pytest.approx(scores[ridge])
    # Without validation data: the middle of the grid, no scores.
    assert pick_ridge(stats, [1e-4, 1e-2, 1e3], None)[0] == 1e-2 and pick_ridge(stats, [1.0], None)[3] == {}


def test_closed_form_needs_method_linear(monkeypatch, capsys):
    from repforge import cli

    with pytest.raises(ConfigError) as info:
        load_config(None, ["finetune.method=lora", "finetune.closed_form=true"])
    message = str(info.value)
    assert message.startswith("finetune.closed_form: ") and "linear" in message and "\n" not in message
    cfg = load_config(None, ["finetune.method=linear", "finetune.closed_form=true", "finetune.ridge=0.1"])
    assert cfg.finetune.closed_form and cfg.finetune.ridge == [0.1]  # one value: a grid of one
    # The CLI: one line, exit 2. Its exit hook would shut down this test session's Ray: kept off.
    monkeypatch.setattr(cli, "_shutdown_ray", lambda: None)
    assert cli.main(["finetune", "--set", "finetune.closed_form=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("repforge: error: finetune.closed_form: "), err


def test_closed_form_linear_probe_on_digits(ray_local, digits_data, tmp_path):
    """Random-init tiny ResNet features on real digits: one pass, a head well above chance (0.1),
    published like any fine-tune, and the artifact reproduces the reported val_acc."""
    from system.data.transforms import eval_transform, images_to_tensor
    from system.models.artifact import load_artifact
    from system.train import run_training

    train_uri, val_uri = digits_data
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"data.train={train_uri}",
            f"data.val={val_uri}",
            "finetune.method=linear",
            "finetune.closed_form=true",
            "data.limit=800",  # keeps the test short; the full 1,438 rows give 0.92
            f"run.storage={tmp_path}",
            "run.name=probe",
        ],
    )
    published = run_training(cfg, "finetune")
    assert set(published) == {"model", "adapter"}
    model, meta = load_artifact(published["model"])
    metrics = meta["metrics"]
    # Measured: 0.886 (ridge 1e-2) on 800 rows, 0.92 on all 1,438. The same features with a
    # broken solver: 0.43 without the inverse (W = X^T Y), 0.09 without the bias, 0.13 with a
    # random head; chance is 0.1.
    assert metrics["val_acc"] > 0.8, metrics
    assert meta["closed_form"] is True and meta["method"] == "linear" and meta["job"] == "finetune"
    assert metrics["trainable_params"] == model.head.weight.numel() + model.head.bias.numel()
    assert metrics["train_rows"] == 800 and metrics["ridge"] in cfg.finetune.ridge
    assert metrics["val_acc"] == max(meta["ridge_val_acc"].values())
    assert len(meta["confusion"]) == 10 and sum(map(sum, meta["confusion"])) == 359
    assert set(meta["per_class_acc"]) == set(meta["classes"])

    table = pq.read_table(storage.parquet_files(val_uri)[0])
    transform = eval_transform(meta["preprocessing"])
    images = torch.from_numpy(images_to_tensor(table.column("image").to_pylist(), transform))
    labels = torch.tensor(table.column("label").to_pylist())
    with torch.inference_mode():
        accuracy = (model.classify(images).argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(
        metrics["val_acc"], abs=1.5 / len(labels)
    )  # at most one borderline image

    run = tmp_path / "probe"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["val_acc"] == pytest.approx(metrics["val_acc"])
    assert (run / "confusion.png").is_file() and (run / "adapter" / "head.pt").is_file()
