"""Schedulers and search algorithms for `repforge sweep`, from `sweep.scheduler` / `sweep.search`.

    sweep:
      scheduler: asha        # asha (default) | pbt | fifo
      search: optuna         # random (default) | grid | optuna | optuna_mo

`grid` turns every `choice` into a grid (continuous domains are refused); `optuna` is
Optuna's TPE through Ray Tune's OptunaSearch; `optuna_mo` is multi-objective Optuna
(the metric in `sweep.mode`'s direction, and the fewest `trainable_params`), whose trials then carry a Pareto
front. `random` samples with `seed`, so a sweep proposes the same trials every time.

`pbt` is Ray Tune's PopulationBasedTraining over a random first population: every
`sweep.perturbation_interval` reports, a trial in the bottom quarter (by `sweep.metric`)
stops, takes the latest checkpoint of one in the top quarter and goes on from it with that
trial's hyperparameters, mutated: a range value x0.8 or x1.2 (kept within its range), a
choice the next value up or down, a quarter of the time resampled (tune/sweep.py starts the
Train run from the checkpoint). The space's domains are what it mutates, so they may only
name keys a run can change mid-way (PBT_MUTABLE), and keep clear of values that regroup the
optimizer's parameters (PBT_GROUPING); fixed values may be anything. Every check raises
ConfigError naming the key, before Ray starts.

    .venv/bin/python -m pytest -q tests/test_sweep.py -k "invalid_search or pbt or optuna or closed_form"
"""

from __future__ import annotations

from functools import partial

from system.config import ConfigError, JobConfig, key_marks
from tune.space import _check, _domain, tune_space

CONTINUOUS = ("loguniform", "uniform", "randint")
# What a trial may change when it goes on from another trial's checkpoint: the keys marked
# PERTURBABLE where they are declared (system/options.py), optimizer and loss settings. Not the
# model, adapter or objective (the weights would not fit), the optimizer type (nor its state), or
# the data, batch size and length (the position would mean nothing).
PBT_MUTABLE = tuple(key for key, mark in key_marks().items() if mark.get("perturbable"))
# A checkpoint's optimizer state loads only into the same parameter groups (system/train/optim.py):
# weight decay 0 merges the decayed weights with the others, head_lr_scale 1 the head with the
# backbone. So PBT must not mutate these to or from the values their marks avoid.
PBT_GROUPING = {key: mark["avoid"] for key, mark in key_marks().items() if "avoid" in mark}


def check_search(cfg: JobConfig) -> None:
    """Refuse combinations of search algorithm, scheduler and space that cannot work."""
    sweep = cfg.sweep
    if cfg.finetune.closed_form:  # the trials would silently train by SGD instead
        raise ConfigError("finetune.closed_form: sweeps train by SGD; run it with repforge finetune")
    if sweep.scheduler == "pbt":
        _check_pbt(cfg)
    if sweep.in_process:
        _check_in_process(cfg)
    for key, spec in sweep.space.items():
        domain = _domain(spec)
        if domain is None:
            continue
        if sweep.search == "grid" and domain[0] in CONTINUOUS:
            raise ConfigError(f"sweep.space.{key}: search grid needs choice or grid values, not {domain[0]}")
        if sweep.search.startswith("optuna") and domain[0] == "grid":
            raise ConfigError(f"sweep.space.{key}: search {sweep.search} samples; write choice, not grid")


def _check_in_process(cfg: JobConfig) -> None:
    """An in-process trial is one training process, whose reports go straight to Tune."""
    if cfg.train.workers != 1 or "train.workers" in cfg.sweep.space:
        raise ConfigError("sweep.in_process: a trial trains in one process; set train.workers 1 (not swept)")
    if cfg.sweep.scheduler == "pbt":
        raise ConfigError("sweep.in_process: pbt trials run as Ray Train runs; use asha or fifo")


def _check_pbt(cfg: JobConfig) -> None:
    sweep, train = cfg.sweep, cfg.train
    if sweep.search != "random":  # Tune's PBT takes no searcher, and a grid is not a population
        raise ConfigError(f"sweep.search: {sweep.search} cannot drive pbt (it samples at random); use random")
    mutated = {key: _domain(spec) for key, spec in sweep.space.items() if _domain(spec) is not None}
    for key, domain in mutated.items():
        if domain[0] == "grid":
            raise ConfigError(f"sweep.space.{key}: pbt mutates values; write choice or a range, not grid")
        if key not in PBT_MUTABLE:
            raise ConfigError(
                f"sweep.space.{key}: pbt cannot change it mid-run (a trial goes on from another's "
                f"checkpoint); it can mutate {', '.join(PBT_MUTABLE)}"
            )
        if key in PBT_GROUPING and PBT_GROUPING[key] in _check(key, *domain):  # choices, or a range's ends
            raise ConfigError(
                f"sweep.space.{key}: pbt cannot mutate it to or from {PBT_GROUPING[key]} (that changes the "
                "optimizer's parameter groups, which a cloned checkpoint must match); leave it out"
            )
    if not mutated:
        raise ConfigError("sweep.space: pbt needs at least one key with a domain to mutate")
    if sweep.num_samples < 2:
        raise ConfigError("sweep.num_samples: pbt needs a population of at least 2 trials")
    if not train.eval_every:
        raise ConfigError("train.eval_every: pbt compares trials at their reports; set it (steps per report)")
    every, saves = train.eval_every * sweep.perturbation_interval, train.checkpoint_every
    if not saves or saves % train.eval_every or every % saves:
        raise ConfigError(
            f"train.checkpoint_every: pbt clones trials every {every} steps (train.eval_every x "
            f"sweep.perturbation_interval) and needs a checkpoint there; set it to {every}"
        )


def grid_space(space: dict) -> dict:
    """search grid: every `choice` becomes `grid`."""
    out = {}
    for key, spec in space.items():
        domain = _domain(spec)
        out[key] = {"grid": domain[1]} if domain and domain[0] == "choice" else spec
    return out


def build_searcher(cfg: JobConfig, max_concurrent: int):
    """The Tune search algorithm, proposing at most `max_concurrent` trials at a time: Optuna,
    or Tune's random/grid variant generator (seeded, which Tune's default is not)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    sweep = cfg.sweep
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=cfg.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=max_concurrent)
    if sweep.search == "optuna_mo":
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(
            metric=[sweep.metric, "trainable_params"], mode=[sweep.mode, "min"], seed=cfg.seed
        )
        return ConcurrencyLimiter(optuna, max_concurrent=max_concurrent)
    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.seed)


def build_scheduler(cfg: JobConfig, reports: int):
    """ASHA (stops weak trials at rungs), PBT (weak trials clone strong ones) or FIFO (none)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    sweep = cfg.sweep
    if sweep.scheduler == "pbt":
        return PopulationBasedTraining(
            metric=sweep.metric,
            mode=sweep.mode,
            time_attr="training_iteration",
            perturbation_interval=sweep.perturbation_interval,
            # Trials' configs are {"overrides": {dotted key: value}}.
            hyperparam_mutations={"overrides": pbt_mutations(sweep.space)},
            custom_explore_fn=partial(_within_ranges, ranges=_ranges(sweep.space)),
        )
    if sweep.scheduler == "asha":
        return ASHAScheduler(
            metric=sweep.metric,
            mode=sweep.mode,
            time_attr="training_iteration",
            grace_period=grace_reports(sweep.grace_period, reports),
            max_t=reports,
            reduction_factor=sweep.reduction_factor,
            brackets=sweep.brackets,
            stop_last_trials=False,  # a finished trial ends on its own, cleanly
        )
    return FIFOScheduler()


def grace_reports(grace_period: int | float, reports: int) -> int:
    """ASHA's grace period in reports: as given (at most a trial's reports), or a share of them."""
    if grace_period < 1:
        return max(1, round(grace_period * reports))
    return min(grace_period, reports)


def pbt_mutations(space: dict) -> dict:
    """PBT's hyperparam_mutations: a choice as a list (PBT moves along it), a range as its Tune domain."""
    domains = tune_space(space)
    out = {}
    for key, spec in space.items():
        domain = _domain(spec)
        if domain is not None:
            out[key] = domain[1] if domain[0] == "choice" else domains[key]
    return out


def _ranges(space: dict) -> dict[str, list]:
    """{key: [lo, hi]} of the range domains (randint's hi included)."""
    return {
        key: _check(key, *_domain(spec))
        for key, spec in space.items()
        if _domain(spec) is not None and _domain(spec)[0] in CONTINUOUS
    }


def _within_ranges(config: dict, ranges: dict[str, list]) -> dict:
    """PBT scales a value by 0.8 or 1.2, which can leave its range, and what validate_space checked."""
    overrides = config["overrides"]
    for key, (lo, hi) in ranges.items():
        overrides[key] = min(max(overrides[key], lo), hi)
    return config
