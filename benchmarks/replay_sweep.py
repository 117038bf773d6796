"""Replay Ray Tune's early-stopping schedulers over a measured grid run, in every visiting order.

    .venv/bin/python benchmarks/replay_sweep.py /tmp/bench-sweep-XXXX [--orders 200] [--save FILE]
    .venv/bin/python benchmarks/replay_sweep.py benchmarks/curves/lr-method-pretrained-rf3.json
        [--space lr-method] [--visits grid|random]

bench_sweep.py measures ASHA against grid search in a few visiting orders of the grid, and
on a space where one point reaches the target its ratio depends mostly on where that point
comes: the median of 3 orders is a noisy number, and each order costs ~10 minutes of
this 2-core machine. Its grid run (the folder's `fifo-order0`) holds every point's whole
learning curve, with the wall-clock time of each report. With one trial at a time, and
trials that train the same in every sweep (training seed 0; tests/test_sweep.py checks that
in-process trials match Train runs), a sweep in another order under a scheduler is those
curves cut where the scheduler stops them. This script feeds the grid's reports, order by
order, to the real Ray Tune scheduler objects (ASHAScheduler, MedianStoppingRule), and adds
up the wall time of what would run. Besides ASHA's grace period and reduction factor, it
replays ASHA with 2-3 brackets (Hyperband's hedge, `sweep.brackets`: a trial joins a bracket
at random, so each order is replayed with numpy's generator seeded by its index), and with
`--visits random` the orders are random permutations of the points rather than Tune's
nested grid order.

A model built on a measurement, not a measurement. What it leaves out: run-to-run noise in
the curves and times, and what stopping a trial costs (in-process: nothing measurable, as
the gaps between reports of the ASHA runs in the folder show). So it first replays the
folder's measured ASHA runs (`asha-order<k>`) in their own visiting orders and prints the
measured ratio beside the replayed one; then, for each setting, the median ratio over
`--orders` visiting orders and the share of orders at x3 or more. A row goes to RESULTS.md.

A work folder lives in /tmp. `--save benchmarks/curves/NAME.json` keeps the reports the
replay reads (about 160 KB); the script takes that file in place of the folder, so a row can
be replayed again, or against another scheduler, without running the grid again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path
from statistics import median

import numpy as np
import yaml
from bench_sweep import SPACES, grid_seconds_to_target, reports, shuffled_space, swept
from common import append_row
from ray.tune.schedulers import MedianStoppingRule, TrialScheduler

from system.config import build_config
from tune.search import build_scheduler


class Trial:
    """What the schedulers read of a Tune trial: its id (MedianStoppingRule also hashes it)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class NothingQueued:
    """What MedianStoppingRule asks of Tune's controller, with one trial at a time: which trials
    wait to run (it pauses a trial for them when it has too few others to compare with)."""

    def get_live_trials(self):
        return []


class GridRun:
    """A grid run's reports, per point, each with the seconds since that point's trial started
    (the end of the trial before it; for the first trial, the median of the others' gaps)."""

    def __init__(self, rows: list[dict], space: str):
        self.rows = rows
        self.space = space
        by_point: dict[tuple, list[dict]] = {}
        for row in sorted(self.rows, key=lambda r: r["training_iteration"]):
            by_point.setdefault(swept(row, self), []).append(row)
        ends = sorted((group[-1]["timestamp"], point) for point, group in by_point.items())
        began = {point: end for (end, _), (_, point) in zip(ends, ends[1:])}
        first_gap = median(by_point[p][0]["timestamp"] - began[p] for p in began)
        began[ends[0][1]] = by_point[ends[0][1]][0]["timestamp"] - first_gap
        self.start = began[ends[0][1]]
        self.curves = {
            point: [{**r, "elapsed": r["timestamp"] - began[point]} for r in group]
            for point, group in by_point.items()
        }
        self.target = max(r["val_acc"] for r in self.rows) - 0.01
        self.reports_per_trial = max(len(curve) for curve in self.curves.values())

    def grid_seconds(self, visits: list[tuple]) -> float:
        return grid_seconds_to_target((self.start, None, self.rows), visits, self.target, self)


def load_runs(source: Path) -> dict:
    """The grid's reports and each measured ASHA run's (with its settings), from a bench_sweep
    work folder (Tune's records) or from the JSON that `--save` wrote of one."""
    if source.is_file():
        return json.loads(source.read_text())

    def slim(rows: list[dict]) -> list[dict]:
        keys = ("training_iteration", "step", "timestamp")
        return [
            {"trial_id": r["trial_id"], "overrides": r["overrides"], "val_acc": float(r["val_acc"])}
            | {key: int(r[key]) for key in keys}
            for r in rows
        ]

    runs = {"grid": slim(reports(source / "fifo-order0")), "asha": {}}
    for run in sorted(source.glob("asha-order*")):
        sweep = yaml.safe_load((run / "best.yaml").read_text())["sweep"]
        settings = {key: sweep.get(key) for key in ("grace_period", "reduction_factor", "in_process")}
        runs["asha"][run.name] = {"sweep": settings, "rows": slim(reports(run))}
    return runs


def replay(grid: GridRun, visits: list[tuple], scheduler, ends: list | None = None) -> float:
    """Seconds to the first report at or above the target, trials run one at a time in order
    `visits`, each cut where `scheduler` stops it (nan: the target is never reached). `ends`,
    when given, gets (reports, seconds) of each trial run before that one."""
    controller, elapsed = NothingQueued(), 0.0
    ends = [] if ends is None else ends
    for index, point in enumerate(visits):
        trial = Trial(f"{index:05d}")
        scheduler.on_trial_add(controller, trial)
        curve = grid.curves[point]
        for row in curve:
            if row["val_acc"] >= grid.target:
                return elapsed + row["elapsed"]
            if scheduler.on_trial_result(controller, trial, row) == TrialScheduler.STOP:
                elapsed += row["elapsed"]
                ends.append((row["training_iteration"], row["elapsed"]))
                break
        else:
            scheduler.on_trial_complete(controller, trial, curve[-1])
            elapsed += curve[-1]["elapsed"]
            ends.append((curve[-1]["training_iteration"], curve[-1]["elapsed"]))
    return float("nan")


def where_time_goes(grid: GridRun, orders: list[list[tuple]], grace: int, rf: int) -> str:
    """Over the orders where ASHA reaches the target: how many trials ran before the one that
    reaches it, and how many of those ran to the end (the ones that cost most)."""
    before, whole, share = [], [], []
    for order in orders:
        ends: list[tuple[int, float]] = []
        if not np.isnan(replay(grid, order, asha(grace, rf, grid.reports_per_trial), ends)) and ends:
            ran_all = [seconds for reports, seconds in ends if reports == grid.reports_per_trial]
            before.append(len(ends))
            whole.append(len(ran_all))
            share.append(sum(ran_all) / sum(seconds for _, seconds in ends))
    return (
        f"ASHA grace {grace} rf {rf}, where the time goes ({len(before)} orders): median {median(before):g} "
        f"trials ran before the one that reaches the target; {median(whole):g} of them ran all "
        f"{grid.reports_per_trial} reports, {median(share):.0%} of those trials' time"
    )


def ceiling(grid: GridRun, visits: list[tuple]) -> float:
    """Seconds to the target for a scheduler that knew the future: every trial that never
    reaches the target stops at its first report. No scheduler gets there; it bounds them all."""
    elapsed = 0.0
    for point in visits:
        hits = [r["elapsed"] for r in grid.curves[point] if r["val_acc"] >= grid.target]
        if hits:
            return elapsed + hits[0]
        elapsed += grid.curves[point][0]["elapsed"]
    return float("nan")


def asha(grace: int, rf: int, reports_per_trial: int, brackets: int = 1):
    """ASHA exactly as `repforge sweep` builds it (tune/search.py)."""
    sweep = {
        "scheduler": "asha",
        "grace_period": grace,
        "reduction_factor": rf,
        "brackets": brackets,
        "metric": "val_acc",
        "mode": "max",
    }
    return build_scheduler(
        build_config({"model": {"name": "test_resnet"}, "sweep": sweep}), reports_per_trial
    )


def median_rule(grace: int):
    return MedianStoppingRule(
        time_attr="training_iteration",
        metric="val_acc",
        mode="max",
        grace_period=grace,
        min_samples_required=3,
    )


def visiting_order(space: str, order: int, visits: str = "grid") -> list[tuple]:
    """bench_sweep's grid in order `order`: Tune nests the keys, the last one varying fastest.
    With `visits="random"`, a random permutation of the same points instead (what a random
    search that drew each point once would visit)."""
    points = list(itertools.product(*(spec["grid"] for spec in shuffled_space(space, order).values())))
    if visits == "random":
        random.Random(order).shuffle(points)
    return points


def measured_runs(asha_runs: dict, grid: GridRun) -> list[tuple[str, float, float]]:
    """(name, measured ratio, replayed ratio) for each measured ASHA run, in its own order."""
    out = []
    for name, run in asha_runs.items():
        sweep, rows = run["sweep"], run["rows"]
        visits = list(dict.fromkeys(swept(r, grid) for r in sorted(rows, key=lambda r: r["trial_id"])))
        # The sweep's start, as GridRun estimates the grid's: first report less the median gap.
        first = min(rows, key=lambda r: r["timestamp"])
        start = first["timestamp"] - (grid.curves[swept(first, grid)][0]["elapsed"])
        hits = [r["timestamp"] - start for r in rows if r["val_acc"] >= grid.target]
        measured = min(hits) if hits else float("nan")
        scheduler = asha(sweep["grace_period"], sweep["reduction_factor"], grid.reports_per_trial)
        replayed = replay(grid, visits, scheduler)
        grid_seconds = grid.grid_seconds(visits)
        out.append((name, grid_seconds / measured, grid_seconds / replayed))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "source",
        type=Path,
        help="a bench_sweep.py work folder (fifo-order0/, asha-order*/), or a --save file",
    )
    parser.add_argument("--space", choices=sorted(SPACES), default="lr-method", help="its --space")
    parser.add_argument("--orders", type=int, default=200, help="visiting orders to replay")
    parser.add_argument(
        "--visits",
        choices=["grid", "random"],
        default="grid",
        help="orders: Tune's grid, each key's values shuffled (as bench_sweep runs it), or random "
        "permutations of the points",
    )
    parser.add_argument(
        "--save", type=Path, help="write the reports replayed to this JSON (benchmarks/curves/)"
    )
    args = parser.parse_args()
    runs = load_runs(args.source)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(runs, separators=(",", ":")))
    grid = GridRun(runs["grid"], args.space)
    per_trial = grid.reports_per_trial
    reaching = [p for p, c in grid.curves.items() if max(r["val_acc"] for r in c) >= grid.target]
    print(f"target {grid.target:.3f}; {len(reaching)} of {len(grid.curves)} points reach it: {reaching}")

    grid_total = max(r["timestamp"] for r in grid.rows) - grid.start
    asha_sweep = next(iter(runs["asha"].values()))["sweep"]  # the measured runs' settings
    asha_setting = f"grace {asha_sweep['grace_period']} rf {asha_sweep['reduction_factor']}" + (
        ", in-process trials" if asha_sweep.get("in_process") else ""
    )
    checks = measured_runs(runs["asha"], grid)
    for name, measured, replayed in checks:
        print(f"{name}: measured x{measured:.2f}, replayed x{replayed:.2f}")

    graces = (1, 2, 3, 5, 9)  # reports; 5 and 9 are a quarter and near half of a 20-report trial
    settings = {f"ASHA grace {g} rf {rf}": (asha, g, rf, per_trial) for g in graces for rf in (2, 3, 4)}
    # Hyperband's hedge against early reports that mislead: brackets with later first rungs.
    settings.update(
        {f"ASHA grace {g} rf 3 brackets {b}": (asha, g, 3, per_trial, b) for g in (1, 3, 5) for b in (2, 3)}
    )
    settings.update({f"median rule grace {g}": (median_rule, g) for g in (1, 2, 3)})
    orders = [visiting_order(args.space, k, args.visits) for k in range(args.orders)]
    grid_seconds = np.array([grid.grid_seconds(o) for o in orders])
    bound = np.median(grid_seconds / np.array([ceiling(grid, o) for o in orders]))
    summary = [
        f"ceiling (trials that never reach the target stopped at their first report): median x{bound:.2f}"
    ]
    print(summary[0])
    print(where_time_goes(grid, orders, 1, 3))
    for label, (factory, *params) in settings.items():
        ratios = []
        for k, order in enumerate(orders):
            np.random.seed(k)  # Ray's ASHA draws each trial's bracket from numpy's global generator
            ratios.append(grid_seconds[k] / replay(grid, order, factory(*params)))
        ratios = np.array(ratios)
        missed = np.isnan(ratios).mean()  # such an order counts as x0 in the median
        line = (
            f"{label}: median x{np.median(np.nan_to_num(ratios)):.2f}, "
            f"x3 or more in {(ratios >= 3).mean():.0%} of orders, target missed in {missed:.0%}"
        )
        print(line, flush=True)
        summary.append(line)
    append_row(
        "replay_sweep.py",
        f"replay (a model, not a measurement) of Ray Tune schedulers over the grid run "
        f"{(args.save or args.source).name} ({grid_total:.0f} s) "
        f"of the bench_sweep.py row with ASHA {asha_setting} "
        f"(bench_sweep --space {args.space}, {per_trial} reports per trial, {len(reaching)} of "
        f"{len(grid.curves)} points reach the target {grid.target:.3f}), {args.orders} visiting orders"
        + (" (random permutations of the points)" if args.visits == "random" else ""),
        "; ".join(summary),
        "grid: the same orders, from the grid run's per-trial times",
        f"check against the measured ASHA runs ({(args.save or args.source).name}; measured / replayed): "
        + ", ".join(f"{name} x{m:.2f} / x{r:.2f}" for name, m, r in checks),
    )


if __name__ == "__main__":
    main()
