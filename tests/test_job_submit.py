"""`ray job submit` of a tiny pretrain against a real Ray head started here on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# A throwaway head on loopback: no token auth (the submit below runs without a token).
HEAD_ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
# A second Ray cluster and a real job: 1.5 min on 2 cores, so make test-long (the 20-minute budget).
pytestmark = [pytest.mark.slow, pytest.mark.long]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group; the group is killed afterwards."""
    ray_bin = Path(sys.executable).with_name("ray")
    gcs_port, dashboard_port = free_port(), free_port()
    # Its own temp dir: `ray start` records "the current cluster" there, and a record in
    # /tmp/ray would make every later plain ray.init() on this machine try to join it.
    temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--temp-dir={temp_dir}",
            # The session's Ray instance already holds the default agent ports on this machine.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=HEAD_ENV,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                # Any answer means the dashboard is up (401 when Ray's token auth is on;
                # `ray job submit` finds the token by itself).
                if httpx.get(f"{address}/api/version", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        else:
            pytest.fail("the Ray head did not come up in 120 s")
        yield address
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then SIGKILL whatever of it is left (gcs, raylet...)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)  # the head ignores SIGTERM for long; the group gets SIGKILL next
    except subprocess.TimeoutExpired:
        pass
    time.sleep(2)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_ray_job_submit_pretrain(ray_head, digits_data, tmp_path):
    train_uri, test_uri = digits_data
    ray_bin = Path(sys.executable).with_name("ray")
    command = [
        str(ray_bin),
        "job",
        "submit",
        "--address",
        ray_head,
        "--",
        sys.executable,
        "-m",
        "repforge",
        "pretrain",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--set",
        f"data.train={train_uri}",
        "--set",
        f"data.val={test_uri}",
        "--set",
        "data.limit=256",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.batch_size=32",
        "--set",
        f"run.storage={tmp_path / 'runs'}",
        "--set",
        "run.name=submitted",
    ]
    for _attempt in range(6):  # the head's job agent registers a few seconds after the dashboard
        done = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=ROOT, env=HEAD_ENV)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            break
        time.sleep(5)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = str(tmp_path / "runs" / "submitted" / "model")
    assert (Path(expected) / "model.json").is_file()
    # The job's own last line is the artifact URI (before the submit tool's closing status lines).
    job_lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert expected in job_lines, done.stdout[-2000:]
