"""ASHA against grid search on the same space: time until a trial within 1 point of the grid's best.

    .venv/bin/python benchmarks/bench_sweep.py [--steps 60] [--eval-every 10] [--grace 3] [--seed 0]
        [--reduction-factor 2]

Both sweeps are `repforge sweep` (tune.sweep.run_sweep) on the real digits data (sklearn's,
split into train/val), fully fine-tuning test_resnet from random init, over the same
8-value learning-rate grid visited in the same (seeded, shuffled) order, one trial at a
time: `scheduler: fifo` trains every trial to the end (plain grid search), `scheduler: asha`
stops trials at its rungs. The grid's best val_acc sets the target (best - 1 point). For
each sweep: seconds from its start to the first report at or above the target, and to its
end. The ratios are grid / ASHA; a row goes to benchmarks/RESULTS.md.

With one trial at a time, ASHA saves what the trials it stops would have cost; how much of
that comes before the first good trial depends on the visiting order (hence --seed). The
whole run takes about 16 minutes on a 2-core machine (each trial's Train start-up is most
of its cost).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import append_row  # benchmarks/common.py (scripts run by path)

LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def sweep_tree(train: str, val: str, storage: str, name: str, scheduler: str, lrs: list, args) -> dict:
    return {
        "seed": args.seed,
        "data": {"train": train, "val": val, "image_size": 32},
        "model": {"name": "test_resnet", "kwargs": {}},
        "finetune": {"method": "full"},
        "train": {
            **{"workers": 1, "cpus_per_worker": 1, "batch_size": 32},
            **{"max_steps": args.steps, "eval_every": args.eval_every, "checkpoint_every": args.steps},
        },
        "run": {"storage": storage, "name": name},
        "sweep": {
            **{"scheduler": scheduler, "search": "grid", "num_samples": 1, "max_concurrent": 1},
            **{"grace_period": args.grace, "reduction_factor": args.reduction_factor},
            **{"metric": "val_acc", "mode": "max", "space": {"train.lr": {"grid": lrs}}},
        },
    }


def reports(folder: Path) -> list[dict]:
    """Every report Tune received in the sweep at `folder`, with its wall-clock timestamp."""
    import pandas as pd
    from ray import tune

    frames = tune.ExperimentAnalysis(str(folder / "_tune")).trial_dataframes.values()
    return pd.concat(frames).to_dict("records")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per full trial")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between reports (ASHA rungs)")
    parser.add_argument("--seed", type=int, default=0, help="visiting order of the grid")
    # Reports before ASHA may stop a trial. At 1 (10 steps from random init) val_acc is noise:
    # the first run (2026-11-22, RESULTS.md) stopped the grid's best lr at its second report.
    parser.add_argument("--grace", type=int, default=3, help="ASHA grace period, in reports")
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA: 1/rf of trials pass a rung")
    args = parser.parse_args()

    import ray

    from system.config import build_config
    from system.data import digits_dataset
    from tune.sweep import run_sweep

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    train, val = digits_dataset(str(work / "digits"))
    lrs = random.Random(args.seed).sample(LRS, len(LRS))
    # A short sweep first, not measured: the first Train run on a new Ray instance starts its
    # worker processes cold (torch, timm imports); without this the grid, measured first, paid
    # that alone (2026-11-23: time to target 78 s grid vs 44 s ASHA, reached by the same trial).
    warm = argparse.Namespace(**{**vars(args), "steps": args.eval_every})
    run_sweep(build_config(sweep_tree(train, val, str(work), "warmup", "fifo", lrs[:1], warm)))
    runs = {}
    for scheduler in ("fifo", "asha"):
        tree = sweep_tree(train, val, str(work), scheduler, scheduler, lrs, args)
        start = time.time()
        run_sweep(build_config(tree))
        runs[scheduler] = (start, time.time() - start, reports(work / scheduler))
    ray.shutdown()  # run_sweep started it

    target = max(r["val_acc"] for r in runs["fifo"][2]) - 0.01
    reached = {}
    for scheduler, (start, total, rows) in runs.items():
        hits = [r["timestamp"] - start for r in rows if r["val_acc"] >= target]
        reached[scheduler] = min(hits) if hits else float("nan")
        stopped = sum(1 for r in rows if r["step"] == args.steps)
        print(
            f"{scheduler}: target {target:.3f} reached at {reached[scheduler]:.0f}s, sweep {total:.0f}s, "
            f"{len(rows)} reports, {stopped} of {len(lrs)} trials ran to the end"
        )
    grid_total, asha_total = runs["fifo"][1], runs["asha"][1]
    speedup = reached["fifo"] / reached["asha"]
    append_row(
        "bench_sweep.py",
        f"digits, test_resnet full fine-tune, lr grid {len(lrs)} values (order seed {args.seed}), "
        f"{args.steps} steps, report every {args.eval_every}, "
        f"ASHA grace {args.grace} rf {args.reduction_factor}, 1 trial at a time, after a warm-up sweep; "
        f"target = grid best val_acc {target + 0.01:.3f} - 1 pt",
        f"ASHA: target at {reached['asha']:.0f}s, sweep {asha_total:.0f}s",
        f"grid: target at {reached['fifo']:.0f}s, sweep {grid_total:.0f}s",
        f"time to target x{speedup:.2f}; whole sweep x{grid_total / asha_total:.2f}",
    )


if __name__ == "__main__":
    main()
