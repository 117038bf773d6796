"""benchmarks/gpu_suite.py --dry-run: every path of the GPU suite, on the CPU with tiny sizes.

    .venv/bin/python -m pytest -q tests/test_gpu_suite.py

The suite's figures need a GPU machine; this checks that each of its measurements runs
(embedding from JPEG bytes, the training input, DDP and FSDP2 training steps, FAISS builds
and searches, /v1/embed through a real Serve app) and that a dry run writes no rows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long  # a Ray instance and a Serve app of its own: 1-5 minutes on 2 busy cores (make test-long)
def test_dry_run_runs_every_measurement_and_writes_no_rows(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("ROW | ")]
    setups = [row.split(" | ")[1] for row in rows]
    assert any(s.startswith("embed test_resnet") for s in setups), out
    assert any(s.startswith("train.gpu_decode input") for s in setups), out
    assert sum(s.startswith("train test_") for s in setups) == 2, out  # test_resnet, test_vit
    from system.index.auto import CANDIDATES

    assert sum(s.startswith("faiss auto candidate") for s in setups) == len(CANDIDATES), out
    assert any(s.startswith("/v1/embed") for s in setups), out
    # The training rows hold DDP and FSDP2 alike.
    train_rows = [row for row in rows if " | train test_" in row]
    assert all("ddp:" in row and "fsdp:" in row for row in train_rows), train_rows
    # Nothing was left out on the CPU but the GPU side of FAISS, which needs a GPU.
    skipped = [line for line in out.splitlines() if line.startswith("NOT MEASURED")]
    assert all("faiss GPU side" in line for line in skipped), skipped
    assert "dry run: no rows written" in out and not results.exists()
