"""Joining Ray the same way in every command: the cluster at RAY_ADDRESS (or a running local
one), else a local instance that this process starts, tuned to reuse its worker processes.

    python -c "from system.ray_env import ensure_ray; ensure_ray(); import ray; print(ray.nodes())"
"""

from __future__ import annotations

import os

import ray


def keep_idle_workers() -> None:
    """Make a Ray instance started from this process keep its idle workers (env defaults).

    Each Ray Data task and Train run imports torch and timm in its worker processes (5-8 s
    per process on 2 CPUs). Ray keeps at most num_cpus idle workers, for 1 s, so every
    run paid the imports again. Kept 5 minutes, up to 8 (or the CPU count) of them: later
    one-epoch digits finetunes on a 2-CPU local instance took 36.1 s instead of 42.5 s
    (x1.18, benchmarks/bench_worker_reuse.py). A raylet reads these variables when it starts, so they
    change nothing when this process joins a running cluster: there, `ray start`'s
    environment decides.
    """
    os.environ.setdefault("RAY_num_workers_soft_limit", str(max(8, os.cpu_count() or 1)))
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(5 * 60 * 1000))


def ensure_ray(**init_kwargs) -> None:
    """ray.init(**init_kwargs) unless this process is connected already."""
    if ray.is_initialized():
        return
    keep_idle_workers()
    ray.init(**init_kwargs)


def started_here() -> bool:
    """Whether this process started the Ray instance it is connected to: a local instance of
    fixed size, which no autoscaler will grow. (Ray has no public call for it; when in doubt,
    False: a cluster that may grow.)"""
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def omp_env() -> dict:
    """The runtime_env that hands this process's OMP_NUM_THREADS (default 1) to the workers."""
    return {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
