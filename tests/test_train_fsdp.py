"""Training under Ray Train, end to end: an FSDP2 run with a worker killed mid-run, and a
run whose length a time budget sets.

Real Ray Train (2 gloo workers on the session's local Ray), real timm model, real
digits. The fault-injection hook (REPFORGE_FAIL_AT_STEP, read by the driver) makes the
last rank exit hard at that step, once, leaving its pid and step in the file
REPFORGE_FAULT_MARKER names; with max_failures=1 the run must restart from its last
checkpoint (its reports then carry `resumed_from_step`) and finish. Resuming a sharded
checkpoint on another number of workers is tested without Ray (tests/test_parallel.py):
a third Ray Train start-up here cost a minute of the suite's time budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from system import storage
from system.config import build_config
from system.train import BUDGET_SKIP_STEPS, BUDGET_TIMED_STEPS, run_training

pytestmark = pytest.mark.slow


def read_metrics(root, run: str) -> list[dict]:
    return [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_run_survives_a_killed_worker(ray_local, digits_data, tmp_path, monkeypatch):
    train, val = digits_data
    tree = {
        "data": {"train": train, "val": val, "image_size": 32},
        "model": {"name": "test_resnet"},
        "objective": {"name": "supervised"},
        "train": {
            "workers": 2,
            "strategy": "fsdp",
            "batch_size": 32,
            "max_steps": 12,
            "lr": 0.003,
            "checkpoint_every": 4,
            "max_failures": 1,
            "cpus_per_worker": 0.5,
            "log_every": 4,
        },
        "run": {"storage": str(tmp_path), "name": "fsdp"},
    }
    marker = tmp_path / "fault.json"
    monkeypatch.setenv("REPFORGE_FAIL_AT_STEP", "6")
    monkeypatch.setenv("REPFORGE_FAULT_MARKER", str(marker))
    published = run_training(build_config(tree), "pretrain")
    monkeypatch.delenv("REPFORGE_FAIL_AT_STEP")
    monkeypatch.delenv("REPFORGE_FAULT_MARKER")

    # The fault happened: the last rank wrote the marker at step 6 and exited, and that
    # process is gone (os.kill(pid, 0) only checks that it exists).
    assert marker.is_file(), "no worker was killed: the fault hook never fired"
    fault = json.loads(marker.read_text())
    assert (fault["step"], fault["rank"]) == (6, 1), fault
    with pytest.raises(ProcessLookupError):
        os.kill(fault["pid"], 0)

    lines = read_metrics(tmp_path, "fsdp")
    steps = [line["step"] for line in lines]
    # The first attempt reported step 4 (with its checkpoint) and died at 6; the restarted
    # workers loaded that checkpoint, so they report from 8 on, each saying where they resumed.
    # A run without the crash would report no resumed_from_step at all.
    assert steps == [4, 8, 12], steps
    assert [line.get("resumed_from_step") for line in lines] == [None, 4, 4], lines
    assert lines[-1]["loss"] < lines[0]["loss"]
    meta = json.loads((tmp_path / "fsdp" / "model" / "model.json").read_text())
    assert meta["metrics"]["step"] == 12 and published["model"] == storage.join(
        str(tmp_path), "fsdp", "model"
    )
    checkpoints = sorted(p for p in (tmp_path / "_ray" / "fsdp").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and len(list((checkpoints[-1] / "state").glob("*.distcp"))) >= 1

    # `repforge runs show` on the finished run: a table row per report and a real PNG.
    done = subprocess.run(
        [sys.executable, "-m", "repforge", "runs", "show", "fsdp", "--storage", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip().splitlines()
    assert out[0].split()[:3] == ["step", "epoch", "loss"] and len(out) == 1 + 3 + 1
    assert (tmp_path / "fsdp" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out[-1].endswith("fsdp/curves.png")


@pytest.mark.long  # 40 s on 2 cores: make test-long (the 20-minute budget of make test)
def test_time_budget_sets_the_run_length(ray_local, digits_data, tmp_path):
    """train.max_minutes: the workers time their first steps, agree on where the budget ends
    and stop there (far before max_steps), with the cosine schedule decayed to zero there."""
    train, _ = digits_data
    tree = {
        "data": {"train": train, "image_size": 32},
        "model": {"name": "test_resnet"},
        "objective": {"name": "supervised"},
        "train": {
            "workers": 2,
            "batch_size": 16,
            "max_steps": 1000,  # about 2 minutes here; the budget is 12 seconds
            "max_minutes": 0.2,
            "cpus_per_worker": 0.5,
            "log_every": 5,
        },
        "run": {"storage": str(tmp_path), "name": "budget"},
    }
    run_training(build_config(tree), "pretrain")
    last = read_metrics(tmp_path, "budget")[-1]
    assert BUDGET_SKIP_STEPS + BUDGET_TIMED_STEPS <= last["step"] < 1000, last
    assert last["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed at the budget's end, not at 1000
    meta = json.loads((tmp_path / "budget" / "model" / "model.json").read_text())
    assert meta["metrics"]["step"] == last["step"]
