"""ASHA against grid search on the same space: time until a trial within 1 point of the grid's best.

    .venv/bin/python benchmarks/bench_sweep.py [--steps 60] [--eval-every 10] [--grace 3]
        [--reduction-factor 2] [--seeds 0 1 2] [--data cifar10] [--space lr-method] [--grid-once]
        [--in-process]

Both sweeps are `repforge sweep` (tune.sweep.run_sweep) on the real digits data (sklearn's,
split into train/val; or with `--data cifar10`, random subsets of the real CIFAR-10),
fine-tuning test_resnet from random init, over the same grid (`--space`: 8 learning rates,
or those x 3 or 5 methods) visited in the same (seeded, shuffled) order, one trial at a time:
`scheduler: fifo` trains every trial to the end (plain grid search), `scheduler: asha`
stops trials at its rungs. The grid's best val_acc sets the target (best - 1 point). For
each sweep: seconds from its start to the first report at or above the target, and to its
end. The ratios are grid / ASHA; a row goes to benchmarks/RESULTS.md.

With one trial at a time, ASHA saves what the trials it stops would have cost; how much of
that comes before the first good trial depends on the visiting order. So both sweeps run
once per order in `--seeds` (the grid shuffled by each seed), and the row gives each
order's numbers and the medians of the ratios. One order of 400-step trials takes about
10 minutes on a 2-core machine. With `--grid-once` the grid runs once, and its time to the
target in each order is summed from its per-trial times (measure_grid_once).

How much ASHA can save is bounded by the space and by what a trial costs: with one trial at
a time, if the first good point is the k-th visited, a grid pays k whole trials (F seconds
each) and ASHA about k-1 stopped ones (S each) and one whole: k F / ((k-1) S + F). Starting
a Ray Train run costs about 15 s here, so S is at least that. With `--in-process` both
sweeps run their trials in Tune's own processes (`sweep.in_process`), with no Train run to
start.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pyarrow.parquet as pq
import ray
from common import CIFAR10, append_row  # benchmarks/common.py (scripts run by path)

from system.config import build_config
from system.data.dataset import digits_dataset
from tune.sweep import run_sweep

LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
# `lr-method` is the issue's own example of a sweep (method x learning rate): on a randomly
# initialised backbone only `full` learns much, so few of its 24 points reach the target.
SPACES = {
    "lr": {"train.lr": LRS},
    "lr-method": {"train.lr": LRS, "finetune.method": ["full", "norm", "linear"]},
    # The same with two adapters added: 40 points, of which (from random init) still only
    # `full` learns much; lora and svfit learn what `linear` does (README, Sweeps). A larger
    # space with the same few good points is where early stopping has the most to save.
    "lr-method-peft": {"train.lr": LRS, "finetune.method": ["full", "norm", "linear", "lora", "svfit"]},
}


def shuffled_space(space: str, order: int) -> dict:
    """The grid of `space` with each key's values in visiting order `order` (Tune nests the keys)."""
    rng = random.Random(order)
    return {key: {"grid": rng.sample(values, len(values))} for key, values in SPACES[space].items()}


def sweep_tree(train: str, val: str, storage: str, name: str, scheduler: str, space: dict, args) -> dict:
    return {
        "seed": args.seed,
        "data": {"train": train, "val": val, "image_size": 32},
        "model": {"name": "test_resnet", "kwargs": {}, "init": args.init},
        "finetune": {"method": "full"},
        "train": {
            **{"workers": 1, "cpus_per_worker": 1, "batch_size": 32},
            **{"max_steps": args.steps, "eval_every": args.eval_every, "checkpoint_every": args.steps},
        },
        "run": {"storage": storage, "name": name},
        "sweep": {
            **{"scheduler": scheduler, "search": "grid", "num_samples": 1, "max_concurrent": 1},
            **{"grace_period": args.grace, "reduction_factor": args.reduction_factor},
            **{"metric": "val_acc", "mode": "max", "space": space},
            # Only when set: the baseline arm of bench_trial_start runs older code, without the key.
            **({"in_process": True} if args.in_process else {}),
        },
    }


def reports(folder: Path) -> list[dict]:
    """Every report Tune received in the sweep at `folder`, with its wall-clock timestamp and
    the trial's point of the space (`overrides`)."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(folder / "_tune"))
    configs = analysis.get_all_configs()
    return [
        {**row, "overrides": configs[path]["overrides"]}
        for path, frame in analysis.trial_dataframes.items()
        for row in frame.to_dict("records")
    ]


def cifar10_subsets(work: Path, train_rows: int, val_rows: int) -> tuple[str, str]:
    """Seeded random subsets of the real CIFAR-10 train and test files (both sorted by class)."""
    uris = []
    for split, rows in (("train", train_rows), ("test", val_rows)):
        table = pq.read_table(CIFAR10 / f"{split}.parquet")
        keep = np.sort(np.random.default_rng(0).choice(len(table), rows, replace=False))
        folder = work / "cifar10" / split
        folder.mkdir(parents=True)
        pq.write_table(table.take(keep), folder / "part-00000.parquet")
        uris.append(str(folder))
    return uris[0], uris[1]


def timed_sweep(train: str, val: str, work: Path, scheduler: str, order: int, seed: int, args) -> tuple:
    """(start time, seconds, reports) of one sweep over the grid in visiting order `order`."""
    name = f"{scheduler}-order{order}"
    space = shuffled_space(args.space, order)
    tree = sweep_tree(
        train, val, str(work), name, scheduler, space, argparse.Namespace(**vars(args), seed=seed)
    )
    start = time.time()
    run_sweep(build_config(tree))
    return start, time.time() - start, reports(work / name)


def seconds_to_target(start: float, rows: list[dict], target: float) -> float:
    """Seconds from a sweep's start to its first report at or above `target` (nan: none)."""
    hits = [r["timestamp"] - start for r in rows if r["val_acc"] >= target]
    return min(hits) if hits else float("nan")


def measure(train: str, val: str, work: Path, seed: int, args) -> dict:
    """Grid, then ASHA, in visiting order `seed`: seconds to the target and to the end of each."""
    runs = {
        scheduler: timed_sweep(train, val, work, scheduler, seed, seed, args)
        for scheduler in ("fifo", "asha")
    }
    target = max(r["val_acc"] for r in runs["fifo"][2]) - 0.01
    out = {"target": target}
    for scheduler, (start, total, rows) in runs.items():
        out[scheduler] = (seconds_to_target(start, rows, target), total)
        finished = sum(1 for r in rows if r["step"] == args.steps)
        print(
            f"order {seed} {scheduler}: target {target:.3f} reached at {out[scheduler][0]:.0f}s, "
            f"sweep {total:.0f}s, {len(rows)} reports, {finished} trials ran to the end",
            flush=True,
        )
    return out


def swept(row: dict, args) -> tuple:
    """The point of the space that a report belongs to."""
    return tuple(row["overrides"][key] for key in SPACES[args.space])


def grid_seconds_to_target(grid: tuple, visits: list[tuple], target: float, args) -> float:
    """Seconds a grid visiting `visits` in that order takes to the target, from one grid run.

    Trials run one at a time, so each took the time from the end of the one before it (the
    first: from the sweep's start) to its own last report; summed in another order, these
    give that order's time up to the first trial that reaches the target, plus that trial's
    own time to its first report at or above it.
    """
    start, _, rows = grid
    by_point: dict[tuple, list[dict]] = {}
    for row in rows:
        by_point.setdefault(swept(row, args), []).append(row)
    ends = sorted((max(r["timestamp"] for r in group), point) for point, group in by_point.items())
    began = {point: previous for previous, (_, point) in zip([start] + [end for end, _ in ends], ends)}
    elapsed = 0.0
    for point in visits:
        hits = [r["timestamp"] for r in by_point[point] if r["val_acc"] >= target]
        if hits:
            return elapsed + min(hits) - began[point]
        elapsed += max(r["timestamp"] for r in by_point[point]) - began[point]
    return float("nan")


def measure_grid_once(train: str, val: str, work: Path, orders: list[int], args) -> dict:
    """One grid run (training seed 0) and one ASHA run per visiting order (training seed 0 too).

    The grid's results do not depend on its order, only its time to the target does: each
    order's is summed from the grid run's per-trial times (grid_seconds_to_target), in the
    order the ASHA run of that order visited the points. A grid of long trials takes too
    long to run once per order on a 2-core machine.
    """
    grid = timed_sweep(train, val, work, "fifo", orders[0], 0, args)
    target = max(r["val_acc"] for r in grid[2]) - 0.01
    print(f"grid: best {target + 0.01:.3f}, sweep {grid[1]:.0f}s", flush=True)
    results = {}
    for order in orders:
        start, total, rows = timed_sweep(train, val, work, "asha", order, 0, args)
        visits = list(dict.fromkeys(swept(r, args) for r in sorted(rows, key=lambda r: r["trial_id"])))
        results[order] = {
            "target": target,
            "asha": (seconds_to_target(start, rows, target), total),
            "fifo": (grid_seconds_to_target(grid, visits, target, args), grid[1]),
        }
        print(f"order {order}: ASHA {results[order]['asha']}, grid {results[order]['fifo']}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per full trial")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between reports (ASHA rungs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="visiting orders of the grid")
    parser.add_argument("--space", choices=sorted(SPACES), default="lr", help="the grid (see SPACES)")
    parser.add_argument(
        "--grid-once",
        action="store_true",
        help="run the grid once and derive its time to target in each order (see measure_grid_once)",
    )
    # digits: most of the grid reaches the target. CIFAR-10 (../shared): a harder task, where
    # the learning rates spread out more.
    parser.add_argument("--in-process", action="store_true", help="sweep.in_process: no Train run per trial")
    # From random init only `full` learns much. A pretrained backbone is the issue's own setup
    # (fine-tuning methods compared from one artifact): e.g. the artifact bench_finetune.py
    # writes, test_resnet trained on CIFAR-10's classes 0-4.
    parser.add_argument("--init", help="model artifact every trial starts from (default: random init)")
    parser.add_argument("--data", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--train-rows", type=int, default=5000, help="cifar10: training images")
    parser.add_argument("--val-rows", type=int, default=1000, help="cifar10: validation images")
    # Reports before ASHA may stop a trial. At 1 (10 steps from random init) val_acc is noise:
    # the first run (2026-11-22, RESULTS.md) stopped the grid's best lr at its second report.
    parser.add_argument("--grace", type=int, default=3, help="ASHA grace period, in reports")
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA: 1/rf of trials pass a rung")
    args = parser.parse_args()
    seeds, data, rows, grid_once = args.seeds, args.data, (args.train_rows, args.val_rows), args.grid_once
    for option in ("seeds", "data", "train_rows", "val_rows", "grid_once"):
        delattr(args, option)

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    if data == "cifar10":
        train, val = cifar10_subsets(work, *rows)
        data = f"CIFAR-10 random subsets (train {rows[0]}, val {rows[1]} of test)"
    else:
        train, val = digits_dataset(str(work / "digits"))
    # A short sweep first, not measured: the first Train run on a new Ray instance starts its
    # worker processes cold (torch, timm imports); without this the grid, measured first, paid
    # that alone (2026-11-23: time to target 78 s grid vs 44 s ASHA, reached by the same trial).
    warm = argparse.Namespace(**{**vars(args), "steps": args.eval_every, "seed": 0})
    one_point = {"train.lr": {"grid": LRS[:1]}}
    run_sweep(build_config(sweep_tree(train, val, str(work), "warmup", "fifo", one_point, warm)))
    if grid_once:
        results = measure_grid_once(train, val, work, seeds, args)
    else:
        results = {seed: measure(train, val, work, seed, args) for seed in seeds}
    ray.shutdown()  # run_sweep started it

    to_target = [r["fifo"][0] / r["asha"][0] for r in results.values()]
    whole = [r["fifo"][1] / r["asha"][1] for r in results.values()]
    per_seed = "; ".join(
        f"order {seed}: ASHA {r['asha'][0]:.0f}s vs grid {r['fifo'][0]:.0f}s to target "
        f"(x{r['fifo'][0] / r['asha'][0]:.2f}), sweep {r['asha'][1]:.0f}s vs {r['fifo'][1]:.0f}s"
        for seed, r in results.items()
    )
    summary = f"time to target x{median(to_target):.2f}; whole sweep x{median(whole):.2f}"
    print(f"median over {len(seeds)} visiting orders: {summary}")
    targets = ", ".join(f"{r['target'] + 0.01:.3f}" for r in results.values())
    grid = " x ".join(f"{key} ({len(values)})" for key, values in SPACES[args.space].items())
    start = "random init"
    if args.init:  # named by its fingerprint: the folder is a temporary one
        meta = json.loads((Path(args.init) / "model.json").read_text())
        start = f"the pretrained artifact {meta['fingerprint']}"
    append_row(
        "bench_sweep.py",
        f"{data}, test_resnet from {start}, grid {grid}, visiting orders "
        f"{' '.join(map(str, seeds))}, {args.steps} steps, report every {args.eval_every}, "
        f"ASHA grace {args.grace} rf {args.reduction_factor}, 1 trial at a time"
        f"{' (in-process trials)' if args.in_process else ''}, after a warm-up sweep; "
        f"target = grid best val_acc ({targets}) - 1 pt",
        f"ASHA, {per_seed}",
        "grid: one grid run (training seed 0), its time to target summed from its per-trial times in "
        "each order ASHA visited"
        if grid_once
        else "grid: the same sweeps with scheduler fifo (training seed = order)",
        f"median over the orders: {summary}",
    )


if __name__ == "__main__":
    main()
