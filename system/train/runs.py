"""Inspect a training run: its metrics as a table and a PNG of the curves.

    repforge runs show runs/my-pretrain            # or a bare run name under ./runs

Reads `{run}/metrics.jsonl` (one JSON line per report, written by the Train controller)
and writes `{run}/curves.png` next to it; the PNG's URI is the last line printed.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from system import storage

# Columns of the table, in this order, when the run reported them.
TABLE_KEYS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "images_per_s",
    "data_wait_share",
    "knn_acc",
    "val_acc",
    "rankme",
)
# One panel each: what a reader checks first (is it learning, is it fast, is it collapsing).
PANELS = (
    ("loss", ("loss",)),
    ("accuracy", ("knn_acc", "val_acc", "val_top5")),
    ("effective rank", ("rankme",)),
    ("alignment / uniformity", ("alignment", "uniformity", "val_uniformity")),
    ("images/s", ("images_per_s",)),
    ("data wait share", ("data_wait_share",)),
)


class RunError(ValueError):
    """A user error: no such run, or a run with no metrics yet."""


def resolve_run(run: str, storage_root: str = "runs") -> str:
    """A run folder URI, or a bare run name under `storage_root`."""
    for uri in (run, storage.join(storage.normalize(storage_root), run)):
        if storage.exists(storage.join(storage.normalize(uri), "metrics.jsonl")):
            return storage.normalize(uri)
    raise RunError(f"no metrics.jsonl for run {run!r} (looked in {run} and {storage_root}/{run})")


def read_metrics(run_uri: str) -> list[dict]:
    lines = storage.read_text(storage.join(run_uri, "metrics.jsonl")).splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    if not rows:
        raise RunError(f"run {run_uri} has no metrics yet")
    return rows


def _cell(value, missing: str) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return missing if value is None else str(value)


def format_table(rows: list[dict], columns=None, missing="", rule=False, justify=str.rjust) -> str:
    """Rows as aligned text columns (runs show; the sweep's leaderboard): `columns`, by default
    the first row's keys; floats to 4 significant digits; `missing` where a row has no value;
    `rule`: a line of dashes under the header; `justify`: str.rjust or str.ljust."""
    columns = list(rows[0]) if columns is None else list(columns)
    cells = [columns] + [[_cell(row.get(k), missing) for k in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(justify(c, w) for c, w in zip(line, widths)) for line in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def show_run(run: str, storage_root: str = "runs") -> str:
    """Print the metrics table; write curves.png into the run folder; return its URI."""
    run_uri = resolve_run(run, storage_root)
    rows = read_metrics(run_uri)
    print(format_table(rows, [k for k in TABLE_KEYS if any(k in row for row in rows)]), flush=True)
    png_uri = storage.join(run_uri, "curves.png")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "curves.png"
        plot_curves(rows, local)
        storage.write_bytes(png_uri, local.read_bytes())
    return png_uri


def plot_confusion(confusion: list[list[int]], classes: list[str], out: Path) -> None:
    """The fine-tune's confusion matrix on data.val (rows: true class), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:  # counts stay readable
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_confusion_png(run_uri: str, meta: dict) -> str | None:
    """`{run}/confusion.png` from a fine-tuned model's meta (None when it has no matrix)."""
    if not meta.get("confusion"):
        return None
    png_uri = storage.join(run_uri, "confusion.png")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "confusion.png"
        plot_confusion(meta["confusion"], meta.get("classes") or [], local)
        storage.write_bytes(png_uri, local.read_bytes())
    return png_uri
