"""Shared fixtures: one real local Ray instance per test session, and real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10"

# Ray workers inherit this: keep thread pools small on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    # The `ray job submit` test starts a second Ray cluster on this machine; Ray Train's
    # placement-group cleaner finds "the" cluster through /tmp/ray, so run it last.
    items.sort(key=lambda item: "test_job_submit" in item.nodeid)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs, shared by every test that needs Ray."""
    import ray

    from system.ray_env import keep_idle_workers

    keep_idle_workers()  # as a job's own local instance does (x1.18 per later Train run)
    # address="local": always a new instance, never one that `ray start` left behind.
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not (SHARED_CIFAR10 / "test.parquet").is_file():
        pytest.skip(f"real CIFAR-10 not present at {SHARED_CIFAR10} (../shared is only on dev/CI machines)")
    return SHARED_CIFAR10


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> tuple[str, str]:
    """scikit-learn's real digits as canonical Parquet: (train_uri, test_uri)."""
    from system.data.dataset import digits_dataset

    return digits_dataset(str(tmp_path_factory.mktemp("digits")))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def quickstart_run(ray_local, tmp_path_factory):
    """`repforge quickstart` run once, for real, as a user runs it (a subprocess of the CLI).

    It joins the session's Ray instance (RAY_ADDRESS), as a job joins a cluster; later
    tests check its artifacts. Returns (storage root, completed process).
    """
    import subprocess
    import sys

    storage = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "repforge",
            "quickstart",
            "--storage",
            str(storage),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env=env,
    )
    return storage, done
