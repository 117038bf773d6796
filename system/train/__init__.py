"""Train stage: pretraining and fine-tuning under Ray Train.

plan.py       driver-side checks and planning (before any Ray work)
inputs.py     the Ray Data input pipeline
loop.py       the loop every worker runs; cadences of evaluation and checkpoints
evaluate.py   validation metrics;  export.py  artifacts out of the final checkpoint
run.py        run_training: one TorchTrainer per job
module.py, parallel.py (DDP/FSDP2), optim.py, checkpoint.py, progress.py, callbacks.py,
linear_probe.py (closed-form fine-tune), run_record.py, runs.py (`repforge runs show`)
"""

from system.train.evaluate import evaluate
from system.train.inputs import cached_input, input_datasets
from system.train.loop import run_loop
from system.train.plan import loop_config, plan_run, planned_steps, uses_gpu
from system.train.progress import BUDGET_SKIP_STEPS, BUDGET_TIMED_STEPS
from system.train.run import build_trainer, checkpoint_policy, run_training

__all__ = [
    "BUDGET_SKIP_STEPS",
    "BUDGET_TIMED_STEPS",
    "build_trainer",
    "cached_input",
    "checkpoint_policy",
    "evaluate",
    "input_datasets",
    "loop_config",
    "plan_run",
    "planned_steps",
    "run_loop",
    "run_training",
    "uses_gpu",
]
