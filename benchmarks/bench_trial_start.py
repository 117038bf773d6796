"""What a sweep trial costs beyond its training steps: this checkout against an earlier commit.

    .venv/bin/python benchmarks/bench_trial_start.py [--baseline-ref f4a4b4f] [--trials 3] [--rounds 2]
        [--in-process]

Each arm is one process that starts its own local Ray instance and runs `repforge sweep`
(tune.sweep.run_sweep) twice on the real digits: a one-trial warm-up sweep (Ray's first
Train run starts cold), then the measured FIFO sweep of `--trials` trials of 20 steps
each (test_resnet, full fine-tune, 1 worker), so that start-up, not training, is most of
what a trial costs. The baseline arm runs the same script on the code of `--baseline-ref`
(a git worktree, put first on PYTHONPATH). The arms alternate for `--rounds` rounds (the
machines are shared and noisy); the claim is the median seconds per trial (the measured
sweep's wall time / its trials) and the ratio baseline / this checkout. A row goes to
benchmarks/RESULTS.md.

f4a4b4f is the commit before three changes: the Train controller and Ray Data's split
coordinator no longer import torch and timm, Tune reuses a finished trial's process for
the next trial, and the controller polls its workers every 0.5 s instead of 2 s.

With `--in-process` this checkout's arm runs its trials in Tune's processes
(`sweep.in_process`), and the baseline's as Ray Train runs: `--baseline-ref HEAD
--in-process` measures what in-process trials save on the same code.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile

from common import ROOT, append_row, seconds_from_script  # benchmarks/common.py (scripts run by path)

SWEEPS = """
import argparse, json, sys, time
sys.path.insert(0, sys.argv[3])  # benchmarks/ of this checkout: bench_sweep's config
from bench_sweep import sweep_tree
from system.config import build_config
from system.data.dataset import digits_dataset
from tune.sweep import run_sweep

root, trials, in_process = sys.argv[1], int(sys.argv[2]), sys.argv[4] == "1"
train, val = digits_dataset(root + "/digits")
args = argparse.Namespace(
    seed=0, steps=20, eval_every=10, grace=1, reduction_factor=3, in_process=in_process, init=None
)
lrs = [1e-3, 3e-3, 1e-2, 3e-4, 3e-2, 1e-4, 1e-5, 3e-5][:trials]
warmup = {"train.lr": {"grid": lrs[:1]}}
run_sweep(build_config(sweep_tree(train, val, root, "warmup", "fifo", warmup, args)))
start = time.perf_counter()
measured = {"train.lr": {"grid": lrs}}
run_sweep(build_config(sweep_tree(train, val, root, "measured", "fifo", measured, args)))
print("SECONDS " + json.dumps(time.perf_counter() - start), flush=True)
"""


def one_arm(trials: int, code: str, in_process: bool = False) -> float:
    """Seconds of the measured sweep, run on the code at `code` (a checkout's root)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="bench-trial-start-") as root:
        argv = [root, str(trials), str(ROOT / "benchmarks"), "1" if in_process else "0"]
        return seconds_from_script(SWEEPS, argv, code, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-ref", default="f4a4b4f", help="git commit of the baseline arm")
    parser.add_argument("--trials", type=int, default=3, help="trials of the measured sweep")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both arms")
    parser.add_argument("--in-process", action="store_true", help="this checkout's arm: sweep.in_process")
    args = parser.parse_args()
    per_trial = {"this checkout": [], args.baseline_ref: []}
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        baseline = os.path.join(tmp, "code")
        add = ["git", "worktree", "add", "--detach", baseline, args.baseline_ref]
        subprocess.run(add, cwd=ROOT, check=True)
        try:
            for round_ in range(args.rounds):
                for arm, code in ((args.baseline_ref, baseline), ("this checkout", str(ROOT))):
                    in_process = args.in_process and code == str(ROOT)
                    seconds = one_arm(args.trials, code, in_process) / args.trials
                    print(f"round {round_ + 1} {arm}: {seconds:.1f} s per trial", flush=True)
                    per_trial[arm].append(seconds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", baseline], cwd=ROOT, check=False)
    new, old = statistics.median(per_trial["this checkout"]), statistics.median(per_trial[args.baseline_ref])
    print(f"median s per trial: this checkout {new:.1f}, {args.baseline_ref} {old:.1f}, x{old / new:.2f}")
    append_row(
        "bench_trial_start.py",
        f"digits, FIFO sweep of {args.trials} trials x 20 steps (test_resnet full fine-tune, 1 worker, "
        f"report every 10) after a warm-up sweep, {args.rounds} rounds; median of sweep wall / trials",
        f"this checkout{' (in-process trials)' if args.in_process else ''}: {new:.1f} s per trial",
        f"{args.baseline_ref} (Ray Train trials): {old:.1f} s per trial",
        f"x{old / new:.2f}",
    )


if __name__ == "__main__":
    main()
