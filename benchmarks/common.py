"""Shared by the benchmark scripts: the machine description and the RESULTS.md row format."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = Path(__file__).resolve().parents[1]
# ../shared is beside development checkouts; elsewhere (a GPU machine) point the variable at a copy.
CIFAR10 = Path(os.environ.get("REPFORGE_CIFAR10", ROOT.parent / "shared" / "datasets" / "cifar10"))


def machine() -> str:
    """CPU count, GPU and the load average when measured (these machines are shared)."""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, load {load:.1f}"


def append_row(script: str, setup: str, repforge: str, baseline: str, ratio: str) -> None:
    cells = [date.today().isoformat(), script, setup, repforge, baseline, ratio, machine()]
    with RESULTS.open("a") as out:
        out.write("| " + " | ".join(c.replace("|", "/") for c in cells) + " |\n")


def seconds_from_script(script: str, args: list[str], cwd, env: dict) -> object:
    """Run `python -c script args...` and return the JSON after its last `SECONDS ` line."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=1800
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("SECONDS ")]
    if done.returncode or not lines:
        raise SystemExit(f"script failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("SECONDS "))
