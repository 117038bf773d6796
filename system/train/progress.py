"""What the training loop measures and times: throughput windows, the time budget
(`train.max_minutes`), peak memory, and the fault-injection hook the restart tests use.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def mean_loss(losses: list) -> float:
    """The mean of a window's losses, kept on the device as tensors: one host sync per report,
    not one per step (a `.item()` each step stalls the GPU's queue)."""
    return float(torch.stack(losses).float().mean()) if losses else float("nan")


class Window:
    """Throughput and time split between waiting for data and computing, since the last report."""

    def __init__(self):
        self.start = self.step_end = time.perf_counter()
        self.data_wait, self.images, self.steps, self.losses = 0.0, 0, 0, []

    def metrics(self, world: int) -> dict:
        elapsed = time.perf_counter() - self.start
        return {
            "loss": mean_loss(self.losses),
            "images_per_s": self.images * world / elapsed,
            "images_per_s_worker": self.images / elapsed,
            "step_time_s": elapsed / max(1, self.steps),
            "data_wait_share": self.data_wait / elapsed,
        }


def fault_injected(config: dict, step: int, rank: int, world: int, resumed: bool) -> bool:
    """Test hook: REPFORGE_FAIL_AT_STEP=N on the driver kills the last rank at step N, once
    (and first writes its pid and step to the file REPFORGE_FAULT_MARKER names, when set).

    "Once": only in an attempt that did not start from a checkpoint, so the restarted run
    (which resumes from one) goes past step N.
    """
    if config.get("fail_at_step") == step and rank == world - 1 and not resumed:
        # Ray Train's controller collects reports by polling workers (every 2 s): a crash
        # right after a report loses that report and its checkpoint. Wait it out, so the
        # test knows which checkpoint the restart must resume from.
        time.sleep(5)
        if config.get("fault_marker"):  # REPFORGE_FAULT_MARKER: the test's proof of the crash
            marker = {"pid": os.getpid(), "step": step, "rank": rank}
            Path(config["fault_marker"]).write_text(json.dumps(marker))
        return True
    return False


# A time budget times steps from step 3 (the data pipeline's start and allocator warm-up
# left out) to step 15, then again from there to a tenth of the way through the run: on
# CPUs the first steps run slower than the steady state (a 20-minute SimCLR run timed only
# at step 15 ended after about 18 minutes, benchmarks/bench_learning.py).
BUDGET_SKIP_STEPS, BUDGET_TIMED_STEPS = 3, 12


class TimeBudget:
    """train.max_minutes: the step at which the run ends, from timed steps, the same on every
    worker (each extrapolates its own step time; they agree on the smallest answer, so all
    ranks stop, and schedule their lr, alike)."""

    def __init__(self, minutes: float, most_steps: int):
        self.seconds, self.most_steps = minutes * 60, most_steps
        self.start = time.perf_counter()
        self.mark: tuple[int, float] | None = None  # (step, time) the timing runs from
        self.check_at: int | None = None
        self.checks = 0

    def after_step(self, step: int, device) -> int | None:
        """A new total step count when this step re-times the run, else None."""
        now = time.perf_counter()
        if self.mark is None:
            if step >= BUDGET_SKIP_STEPS:
                self.mark, self.check_at = (step, now), step + BUDGET_TIMED_STEPS
            return None
        if step != self.check_at:
            return None
        per_step = (now - self.mark[1]) / (step - self.mark[0])
        fits = step + max(0, int((self.seconds - (now - self.start)) / per_step))
        answer = torch.tensor([min(self.most_steps, fits)], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(answer, op=torch.distributed.ReduceOp.MIN)
        total = int(answer.item())
        self.checks += 1
        later = step + (total - step) // 10
        self.mark = (step, now)
        self.check_at = later if self.checks == 1 and later - step >= BUDGET_TIMED_STEPS else None
        return total
