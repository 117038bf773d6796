"""Kept idle Ray workers (system/ray_env.py) against Ray's defaults: seconds per Train run.

    .venv/bin/python benchmarks/bench_worker_reuse.py [--runs 3] [--rounds 2]

Each arm is one process that starts its own local Ray instance (as a job does on one
machine) and runs `--runs` one-epoch LoRA fine-tunes of test_resnet on the real digits
one after another. "kept" uses repforge's defaults (up to 8 idle workers kept 5 minutes);
"Ray default" sets Ray's own values back (num_cpus idle workers, killed after 1 s). The
first run of each process starts cold in both arms, so the claim is on the later runs:
their median seconds, and the ratio default / kept. The arms alternate for `--rounds`
rounds (the machines are shared and noisy). A row goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from common import ROOT, append_row, seconds_from_script  # benchmarks/common.py (scripts run by path)

RUNS = """
import json, sys, time
from system.config import load_config
from system.data.dataset import digits_dataset
from system.ray_env import ensure_ray
from system.train import run_training

root, runs = sys.argv[1], int(sys.argv[2])
train, val = digits_dataset(root + "/digits")
ensure_ray()
seconds = []
for i in range(runs):
    start = time.perf_counter()
    overrides = [f"data.train={train}", f"data.val={val}", f"run.storage={root}/runs", f"run.name=r{i}",
                 "train.epochs=1", "objective.name=supervised"]
    run_training(load_config(sys.argv[3], overrides), "finetune")
    seconds.append(time.perf_counter() - start)
print("SECONDS " + json.dumps(seconds), flush=True)
"""
# Ray's own values for a local instance: one idle worker per CPU, killed after 1 s idle.
RAY_DEFAULTS = {
    "RAY_num_workers_soft_limit": str(os.cpu_count()),
    "RAY_idle_worker_killing_time_threshold_ms": "1000",
}


def one_arm(runs: int, ray_env: dict) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in RAY_DEFAULTS and k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as root:
        config = str(ROOT / "configs" / "quickstart.yaml")
        return seconds_from_script(RUNS, [root, str(runs), config], ROOT, {**env, **ray_env})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="Train runs per process (>= 2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both arms")
    args = parser.parse_args()
    later = {"kept": [], "Ray default": []}
    for round_ in range(args.rounds):
        for arm, env in (("Ray default", RAY_DEFAULTS), ("kept", {})):
            seconds = one_arm(args.runs, env)
            print(f"round {round_ + 1} {arm}: " + ", ".join(f"{s:.1f}" for s in seconds) + " s", flush=True)
            later[arm] += seconds[1:]
    kept, default = statistics.median(later["kept"]), statistics.median(later["Ray default"])
    print(f"later runs, median: kept {kept:.1f} s, Ray default {default:.1f} s, x{default / kept:.2f}")
    append_row(
        "bench_worker_reuse.py",
        f"digits, test_resnet LoRA finetune 1 epoch, 2 workers, {args.runs} runs per process, "
        f"{args.rounds} rounds; median of runs 2..{args.runs}",
        f"kept idle workers: {kept:.1f} s per run",
        f"Ray default: {default:.1f} s per run",
        f"x{default / kept:.2f}",
    )


if __name__ == "__main__":
    main()
