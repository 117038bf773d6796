"""Search spaces: the `sweep.space` section of a config, dotted keys -> Ray Tune domains.

    sweep:
      space:
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        finetune.rank: {choice: [4, 8, 16]}
        train.batch_size: {grid: [32, 64]}
        train.warmup_steps: {randint: [0, 20]}   # upper bound exclusive
        finetune.dropout: 0.1                    # a plain value is fixed

A mapping with one key whose value is a list is a domain; to fix a key to a mapping
(e.g. model.kwargs) write it with more than one key, or as {choice: [mapping]}.
Everything is checked before Ray starts: every key and every value a domain can take
at its bounds is applied to the base config and validated like `--set`.

    .venv/bin/python -m pytest -q tests/test_sweep.py -k "space and not pbt"
"""

from __future__ import annotations

import copy
from typing import Any

from system.config import ConfigError, JobConfig, build_config, set_dotted

ARITY = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}
NOT_SWEPT = ("sweep.", "run.")


def _domain(value: Any) -> tuple[str, list] | None:
    """(name, args) when `value` is written as a domain, else None (a fixed value)."""
    if isinstance(value, dict) and len(value) == 1:
        name, args = next(iter(value.items()))
        if isinstance(args, list):
            return str(name), [_number(a) for a in args] if ARITY.get(name) else args
    return None


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; bounds are meant as numbers."""
    for kind in (int, float):
        try:
            return kind(value) if isinstance(value, str) else value
        except ValueError:
            pass
    return value


def _check(key: str, name: str, args: list) -> list:
    """Validate one domain; returns the values to try against the config."""
    if name not in ARITY:
        raise ConfigError(f"sweep.space.{key}: unknown domain {name!r} (expected one of {', '.join(ARITY)})")
    if ARITY[name] is None:
        if not args:
            raise ConfigError(f"sweep.space.{key}: {name} needs at least one value")
        return args
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if len(args) != ARITY[name] or not numbers:
        raise ConfigError(f"sweep.space.{key}: {name} needs two numbers [lo, hi], got {args}")
    lo, hi = args
    if lo >= hi:
        raise ConfigError(f"sweep.space.{key}: {name} needs lo < hi, got [{lo}, {hi}]")
    if name == "loguniform" and lo <= 0:
        raise ConfigError(f"sweep.space.{key}: loguniform needs lo > 0, got {lo}")
    if name == "randint":
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise ConfigError(f"sweep.space.{key}: randint needs integers, got [{lo}, {hi}]")
        return [lo, hi - 1]  # Tune's randint excludes hi
    return [lo, hi]


def validate_space(cfg: JobConfig, space: dict | None = None) -> dict[str, list]:
    """Check the space against the base config; returns {key: values tried} (raises ConfigError)."""
    space = cfg.sweep.space if space is None else space
    if not space:
        raise ConfigError("sweep.space: empty; give at least one dotted key to search over")
    base = cfg.model_dump()
    tried = {}
    for key, spec in space.items():
        if not isinstance(key, str) or key.startswith(NOT_SWEPT):
            raise ConfigError(f"sweep.space.{key}: run.* and sweep.* keys cannot be searched over")
        domain = _domain(spec)
        tried[key] = _check(key, *domain) if domain else [spec]
        for value in tried[key]:
            tree = copy.deepcopy(base)
            try:
                set_dotted(tree, key, value)
                _check_names(build_config(tree), key)
            except ConfigError as err:
                raise ConfigError(f"sweep.space.{key}: {value!r} is not valid ({err})") from None
    return tried


def _check_names(cfg: JobConfig, key: str) -> None:
    """The name the config cannot check itself, timm's model, when `key` sets it (the config
    checks objective.name and finetune.method against their registries)."""
    import timm

    if key == "model.name" and not timm.is_model(cfg.model.name):
        raise ConfigError(f"model.name: unknown timm model {cfg.model.name!r}")


def tune_space(space: dict) -> dict:
    """{dotted key: Tune domain or fixed value}, for `param_space`."""
    from ray import tune

    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    out = {}
    for key, spec in space.items():
        domain = _domain(spec)
        if domain is None:
            out[key] = spec
        elif domain[0] in make:
            out[key] = make[domain[0]](*domain[1])
        else:
            out[key] = (tune.choice if domain[0] == "choice" else tune.grid_search)(domain[1])
    return out
