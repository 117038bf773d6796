"""Sweep outputs: the leaderboard (CSV; its terminal table is system.train.runs.format_table)
and the Pareto front of the metric against trainable parameters (CSV and PNG). Plain
functions over leaderboard rows.

    .venv/bin/python -m pytest -q tests/test_sweep.py -k "pareto or asha"
"""

from __future__ import annotations

import csv
import io
import math

STATUS_ORDER = {"DONE": 0, "STOPPED": 1, "ERROR": 2}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sort_rows(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Finished trials first (a stopped trial's metric comes from fewer steps), then best first."""
    sign = -1 if mode == "max" else 1
    return sorted(
        rows, key=lambda r: (STATUS_ORDER[r["status"]], not finite(r[metric]), sign * (r[metric] or 0))
    )


def pareto_front(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Trials that no other trial beats on both the metric and trainable_params (fewest first).

    Finished trials only, when there are any: a stopped trial's metric is not comparable.
    """
    usable = [
        r for r in rows if r["status"] != "ERROR" and finite(r[metric]) and finite(r["trainable_params"])
    ]
    done = [r for r in usable if r["status"] == "DONE"]
    usable = done or usable
    sign = 1 if mode == "max" else -1
    front, best = [], -math.inf
    for row in sorted(usable, key=lambda r: (r["trainable_params"], -sign * r[metric])):
        if sign * row[metric] > best:  # strictly better than every cheaper trial
            front.append(row)
            best = sign * row[metric]
    return front


def pareto_png(rows: list[dict], front: list[dict], metric: str, path: str) -> None:
    """Scatter of every trial, the front drawn as a step line; written to a local `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    from matplotlib import pyplot as plt

    points = [r for r in rows if finite(r[metric]) and finite(r["trainable_params"])]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter([r["trainable_params"] for r in points], [r[metric] for r in points], c="0.6", label="trials")
    if front:
        xs, ys = [r["trainable_params"] for r in front], [r[metric] for r in front]
        ax.step(xs, ys, where="post", c="C3", label="Pareto front")
        ax.scatter(xs, ys, c="C3")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
