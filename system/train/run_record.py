"""The config a run or a sweep was started with, kept beside it, so that running the same
`run.name` again continues that run only with settings its checkpoints can take.

A run folder (`{run.storage}/{run.name}`) gets `config.json` when it starts. Running the
same name again resumes the run (Ray Train finds its checkpoints), which fails deep in
the workers, with a traceback, when the model, the adapter or the objective changed in
between; a sweep resumed with another space or budget mixes two sweeps. This check turns
both into one line before any Ray work starts.
"""

from __future__ import annotations

import json

from system import storage
from system.config import ConfigError

CONFIG_FILE = "config.json"
# What a training run's checkpoints depend on: the model, its objective's heads or its
# adapter, the classes (the head's size), and the optimizer state. Anything else (max_steps,
# lr, data paths) may change between a run and its continuation.
_SHARED_KEYS = ("model", "objective", "train.optimizer", "train.strategy", "classes")
TRAINING_KEYS = {"pretrain": _SHARED_KEYS, "finetune": (*_SHARED_KEYS, "finetune")}


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config keys as `--set` spells them."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def record(folder: str, tree: dict) -> None:
    storage.write_text(storage.join(folder, CONFIG_FILE), json.dumps(tree, indent=1, default=str))


def changes(folder: str, tree: dict, keys=None, ignore=()) -> list[str]:
    """Settings (under `keys`, all when None; not under `ignore`) that differ from the ones
    recorded in `folder`, as "key: recorded -> now"; none when there is no record."""
    uri = storage.join(folder, CONFIG_FILE)
    if not storage.exists(uri):
        return []
    before = flatten(json.loads(storage.read_text(uri)))
    now = flatten(json.loads(json.dumps(tree, default=str)))  # as the record stores it
    names = sorted(set(before) | set(now))
    return [
        f"{name}: {before.get(name)!r} -> {now.get(name)!r}"
        for name in names
        if (keys is None or _under(name, keys)) and not _under(name, ignore)
        if before.get(name) != now.get(name)
    ]


def check_same(folder: str, tree: dict, what: str, keys=None, ignore=()) -> None:
    """ConfigError (one line) when `folder` was started with other settings under `keys`."""
    found = changes(folder, tree, keys, ignore)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise ConfigError(
            f"run.name: {what} {folder} was started with other settings ({'; '.join(found[:3])}{more}); "
            "to continue it use the same ones, or start another run.name"
        )
