"""Training checkpoints: sharded model + optimizer state (torch.distributed.checkpoint) and progress.

A checkpoint folder holds `state/` (one `.distcp` file per rank that owns data, plus
DCP's `.metadata`) and `progress.json` (step, epoch, batches consumed in the epoch,
world size). Each rank writes its own shard into its own local folder and reports it
with `ray.train.report(checkpoint=...)`; Ray Train gathers them into one storage folder.
Loading goes through DCP's planner, so a run saved on N workers resumes on M (DDP or
FSDP alike): the state is resharded on load.

    save_checkpoint(folder, model, optimizer, progress, rank)
    progress = load_checkpoint(folder, model, optimizer)

    .venv/bin/python -m pytest -q tests/test_parallel.py -k checkpoint
    .venv/bin/python -m pytest -q tests/test_train_fsdp.py -k killed_worker
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

# torch.distributed.checkpoint is imported where it is used: importing it costs about 1 s on
# 2 CPUs, and every Ray process that unpickles the training function (the Train controller,
# a sweep's trial actors) imports this module without ever saving a checkpoint.

PROGRESS = "progress.json"


def save_checkpoint(folder: Path, model: nn.Module, optimizer, progress: dict, rank: int) -> None:
    """Collective: every rank calls it with its own (local, empty) folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / "state"))
    if rank == 0:
        (folder / PROGRESS).write_text(json.dumps(progress))


def load_checkpoint(folder: Path, model: nn.Module, optimizer) -> dict:
    """Collective: restore model and optimizer in place from a (gathered) checkpoint; returns progress."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((folder / PROGRESS).read_text())


def full_model_state(model: nn.Module) -> dict:
    """Collective: the unsharded state dict on CPU (every rank gets it; rank 0 exports it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
