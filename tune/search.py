"""Schedulers and search algorithms for `repforge sweep`, from `sweep.scheduler` / `sweep.search`.

    sweep:
      scheduler: asha        # asha (default) | pbt | fifo
      search: optuna         # random (default) | grid | optuna | optuna_mo

`pbt` is refused for now: its exploit step needs each trial's Train run to start
from another trial's checkpoint, which system/train.py does not take yet.
`grid` turns every `choice` into a grid (continuous domains are refused); `optuna` is
Optuna's TPE through Ray Tune's OptunaSearch; `optuna_mo` is multi-objective Optuna
(the metric in `sweep.mode`'s direction, and the fewest `trainable_params`), whose trials then carry a Pareto
front. Every check raises ConfigError naming the key, before Ray starts.
"""

from __future__ import annotations

from system.config import ConfigError, JobConfig
from tune.space import _domain

CONTINUOUS = ("loguniform", "uniform", "randint")


def check_search(cfg: JobConfig) -> None:
    """Refuse combinations of search algorithm, scheduler and space that cannot work."""
    sweep = cfg.sweep
    for key, spec in sweep.space.items():
        domain = _domain(spec)
        if domain is None:
            continue
        if sweep.search == "grid" and domain[0] in CONTINUOUS:
            raise ConfigError(f"sweep.space.{key}: search grid needs choice or grid values, not {domain[0]}")
        if sweep.search.startswith("optuna") and domain[0] == "grid":
            raise ConfigError(f"sweep.space.{key}: search {sweep.search} samples; write choice, not grid")
    if sweep.scheduler == "pbt":
        # PBT clones a trial from another trial's checkpoint; the trial's Train run has to start
        # from that checkpoint, which system.train does not accept yet.
        raise ConfigError(
            "sweep.scheduler: pbt is not available yet (trials cannot start from another's checkpoint)"
        )


def grid_space(space: dict) -> dict:
    """search grid: every `choice` becomes `grid`."""
    out = {}
    for key, spec in space.items():
        domain = _domain(spec)
        out[key] = {"grid": domain[1]} if domain and domain[0] == "choice" else spec
    return out


def build_searcher(cfg: JobConfig):
    """The Tune search algorithm (None = Tune's random/grid variant generator)."""
    sweep = cfg.sweep
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=cfg.seed)
    if sweep.search == "optuna_mo":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(
            metric=[sweep.metric, "trainable_params"], mode=[sweep.mode, "min"], seed=cfg.seed
        )
    return None


def build_scheduler(cfg: JobConfig, reports: int):
    """ASHA (stops weak trials at rungs) or FIFO (none); `pbt` is refused by check_search."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep = cfg.sweep
    if sweep.scheduler == "asha":
        return ASHAScheduler(
            metric=sweep.metric,
            mode=sweep.mode,
            time_attr="training_iteration",
            grace_period=min(sweep.grace_period, reports),
            max_t=reports,
            reduction_factor=2,
            stop_last_trials=False,  # a finished trial ends on its own, cleanly
        )
    return FIFOScheduler()
