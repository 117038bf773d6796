"""Typed job configuration: YAML preset + `--set dotted.key=value` overrides.

Every field's description doubles as `--help` text. Configs are validated before any
Ray work starts; a bad key or value raises ConfigError with one line naming the key.
The validated config crosses into Ray workers as a plain dict (`cfg.model_dump()`)
and is rebuilt there with `JobConfig.model_validate(d)`.

The `objective` and `finetune` sections hold the keys every objective / adapter method
shares, plus each registered one's own options, declared in its own file
(system/objectives/<name>.py, system/adapters/<name>.py) and composed here into flat keys
(system/options.py). So this module imports the registries, and with them torch (not timm).

    python -c "from system.config import load_config; print(load_config('configs/quickstart.yaml'))"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The registries' package faces: importing them registers every member, whose options become keys.
from system.adapters import ADAPTERS
from system.objectives import OBJECTIVES
from system.options import PERTURBABLE, compose_section, marks, perturbable


class ConfigError(ValueError):
    """A user error in a config: the message is one line that names the key."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float: PyYAML (YAML 1.1) wants a dot and keeps a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


class Section(BaseModel):
    # extra="forbid" turns a typo in a key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    train: str | None = Field(None, description="training dataset URI: a folder or Parquet file(s)")
    val: str | None = Field(None, description="validation dataset URI (labelled), or none")
    image_size: int | None = Field(
        None, ge=8, le=1024, description="input size in pixels; none = the timm model's default"
    )
    limit: int | None = Field(None, ge=1, description="use only the first N rows (smoke runs)")
    shuffle: Literal["global", "local", "none"] = Field(
        "global",
        description="training order: global (Ray Data random_shuffle, new order every epoch), "
        "local (a 10-batch buffer per worker: cheap, for pre-shuffled data) or none",
    )
    cache_mb: float = Field(
        1024,
        ge=0,
        description="datasets whose Parquet files are smaller than this (and than a quarter of Ray's "
        "object store) are read once and kept in the object store for every epoch; 0 = read every epoch",
    )
    balance: bool = Field(
        False,
        description="class-balanced sampling: every class is drawn equally often in an epoch (rare "
        "classes' rows repeat, common ones' are subsampled; the epoch keeps its size); needs labels",
    )
    hflip: bool = Field(
        True,
        description="random horizontal flips in the SSL views; false for digits, text and other "
        "images that flipping changes the meaning of",
    )


class ModelConfig(Section):
    name: str = Field("resnet18", description="timm model name")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword args for timm.create_model")
    init: str | None = Field(None, description="model artifact folder to start from, or none")
    pretrained: bool = Field(False, description="load timm pretrained weights (downloads; off by default)")


class ObjectiveBase(Section):
    """The `objective` keys every objective shares; ObjectiveConfig adds each one's own options."""

    name: str = Field("simclr", description="training objective of a pretrain (a finetune trains supervised)")
    matryoshka_dims: list[int] = Field(
        default_factory=list,
        description="nested embedding prefixes each trained on their own, e.g. [32, 64, 128]; [] = off",
    )
    compatible_with: str | None = Field(
        None,
        description="old model artifact whose index the new model must search (backward-compatible "
        "training, docs/upgrades.md); none = off",
    )
    compat_weight: float = Field(1.0, ge=0, description="weight of the compatibility loss (compatible_with)")

    @model_validator(mode="after")
    def _dims_increasing(self):
        dims = self.matryoshka_dims
        if any(d < 1 for d in dims) or dims != sorted(set(dims)):
            raise ValueError("matryoshka_dims must be positive and strictly increasing")
        return self


class FinetuneBase(Section):
    """The `finetune` keys every method shares; FinetuneConfig adds each one's own options."""

    method: str = Field("lora", description="adaptation method")
    head_lr_scale: float = Field(
        10.0,
        gt=0,
        description="learning-rate multiplier for the new head",
        json_schema_extra=perturbable(avoid=1),  # 1 merges the head's parameter group into the backbone's
    )


# Flat sections: `objective.temperature`, `finetune.energy`, whichever file declares them.
ObjectiveConfig = compose_section(
    ObjectiveBase, "objective", "name", "objective", {n: o.options for n, o in OBJECTIVES.items()}
)
FinetuneConfig = compose_section(
    FinetuneBase, "finetune", "method", "method", {n: m.options for n, m in ADAPTERS.items()}
)


class TrainConfig(Section):
    workers: int = Field(2, ge=1, description="number of Ray Train workers")
    batch_size: int = Field(64, ge=1, description="batch size per worker")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    epochs: int | None = Field(None, ge=1, description="passes over the training data")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="time budget: the workers time their steps (at step 15 and a tenth of the way "
        "through) and end the run (at most max_steps/epochs) at the step that fits in this many "
        "minutes; the cosine schedule decays to zero there",
    )
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate", json_schema_extra=PERTURBABLE)
    optimizer: Literal["adamw", "sgd", "lars"] = Field("adamw", description="optimizer: adamw | sgd | lars")
    momentum: float = Field(
        0.9, ge=0, lt=1, description="momentum (sgd, lars)", json_schema_extra=PERTURBABLE
    )
    weight_decay: float = Field(
        0.05,
        ge=0,
        description="weight decay (not applied to norms and biases)",
        json_schema_extra=perturbable(avoid=0),  # 0 merges the decayed weights' group with the others'
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="clip the gradient norm to this; none = off", json_schema_extra=PERTURBABLE
    )
    accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_steps: int = Field(
        0, ge=0, description="linear warmup steps before cosine decay", json_schema_extra=PERTURBABLE
    )
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism: ddp | fsdp (FSDP2)")
    activation_checkpointing: bool = Field(False, description="fsdp: recompute block activations")
    cpu_offload: bool = Field(False, description="fsdp: keep parameters and optimizer state on the CPU")
    use_gpu: bool | None = Field(None, description="one GPU per worker; none = when the cluster has GPUs")
    compile: bool | None = Field(None, description="torch.compile each block; none = on GPUs, off on CPUs")
    gpu_decode: bool = Field(
        False, description="decode JPEGs and augment on the worker's GPU (nvJPEG), not in CPU tasks"
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    log_every: int = Field(10, ge=1, description="report metrics every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate and report every N steps (0 = at the end only)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = at the end only)")
    max_failures: int = Field(0, ge=0, description="restarts from the last checkpoint after a worker dies")
    keep_last: int | None = Field(2, ge=1, description="checkpoints kept (the newest); none = all")
    keep_best: Literal["loss", "knn_acc", "val_acc", "val_top5", "rankme"] | None = Field(
        None,
        description="keep the keep_last checkpoints best by this metric (loss: lowest; the others: "
        "highest) instead of the newest; the newest is kept too, to resume from",
    )

    @field_validator("compile", "gpu_decode")
    @classmethod
    def _gpu_only(cls, value, info):
        # Both need CUDA; a CPU run (the job's own Ray instance without GPUs) is refused at plan time.
        if value and info.data.get("use_gpu") is False:
            raise ValueError("needs GPU workers, and train.use_gpu is false")
        return value

    @model_validator(mode="after")
    def _length_given(self):
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1
        return self

    @model_validator(mode="after")
    def _best_is_measured_at_checkpoints(self):
        # Evaluation metrics exist only at eval steps; a checkpoint without one would rank last.
        every, eval_every = self.checkpoint_every, self.eval_every
        if self.keep_best not in (None, "loss") and every and (not eval_every or every % eval_every):
            raise ValueError(
                f"keep_best {self.keep_best} is measured at evaluations only (eval_every={eval_every}): "
                "set checkpoint_every to a multiple of eval_every, or to 0"
            )
        return self


class RunConfig(Section):
    storage: str = Field("./runs", description="root URI for artifacts (a folder, or s3://...)")
    name: str | None = Field(None, description="run name; none = job name + timestamp")


class SweepConfig(Section):
    num_samples: int = Field(4, ge=1, description="number of trials")
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="search space over dotted keys, e.g. {train.lr: {loguniform: [1e-4, 1e-2]}}",
    )
    metric: str = Field("val_acc", description="metric to optimise")
    mode: Literal["max", "min"] = Field("max", description="maximise or minimise the metric")
    max_concurrent: int | None = Field(None, ge=1, description="concurrent trials; none = from cluster CPUs")
    grace_period: int | float = Field(
        1,
        gt=0,
        description="ASHA: reports before a trial may be stopped, or below 1 a share of a trial's reports "
        "(0.25: the first quarter; from pretrained weights early reports mislead, see README)",
    )
    reduction_factor: int = Field(
        2, ge=2, le=16, description="ASHA: rungs at grace x rf^k reports; 1/rf of the trials pass each rung"
    )
    brackets: int = Field(
        1,
        ge=1,
        le=4,
        description="ASHA: brackets, Hyperband's hedge (each trial joins one at random; each bracket's "
        "first rung is rf times later than the one before); measured on CIFAR-10 in the README",
    )
    perturbation_interval: int = Field(
        2, ge=1, description="PBT: reports between exploits (a weak trial clones a strong one's checkpoint)"
    )
    scheduler: Literal["asha", "pbt", "fifo"] = Field("asha", description="trial scheduler")
    search: Literal["random", "grid", "optuna", "optuna_mo"] = Field(
        "random", description="search algorithm; optuna_mo = maximise metric, minimise trainable params"
    )
    rank_prior: float | None = Field(
        None, gt=0, le=1, description="energy share for the spectrum pre-pass (sets rank_pattern); none = off"
    )
    in_process: bool = Field(
        False,
        description="each trial trains in its own Tune process, with no Ray Train run to start (for many "
        "short one-worker trials: train.workers 1; asha or fifo)",
    )

    @field_validator("grace_period")
    @classmethod
    def _whole_reports_or_a_share(cls, value):
        if value >= 1 and value != int(value):
            raise ValueError("a whole number of reports, or a share of a trial's reports below 1")
        return int(value) if value >= 1 else value


class JobConfig(Section):
    """One config for the training jobs (pretrain, finetune, sweep): they share keys."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    seed: int = Field(0, ge=0, description="random seed")


def key_marks() -> dict[str, dict]:
    """{dotted key: its markers} of every key that has some (PERTURBABLE ..., system/options.py)."""
    found = {}
    for section, field in JobConfig.model_fields.items():
        for name, info in getattr(field.annotation, "model_fields", {}).items():
            if marks(info):
                found[f"{section}.{name}"] = marks(info)
    return found


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not all(key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key or key part in {key!r}")
    try:
        value = _load_yaml(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set `key` in `tree`. Below a free-form mapping field (model.kwargs, sweep.space) the
    rest of the key is one key, so `sweep.space.train.lr=...` sets the search-space key `train.lr`."""
    parts = key.split(".")
    node, section = tree, JobConfig
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or an empty `section:` in the YAML file
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a section")
        node = child
        field = section.model_fields.get(part) if section is not None else None
        annotation = field.annotation if field is not None else None
        if get_origin(annotation) is dict:
            node[".".join(parts[i + 1 :])] = value
            return
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        section = annotation if is_section else None
    node[parts[-1]] = value


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = " ".join(first["msg"].split())  # one line, whatever pydantic puts in it
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{key}: {msg}"


def check_gpu_options(train: TrainConfig, use_gpu: bool) -> None:
    """train.compile / train.gpu_decode set on a run whose workers get no GPU: one line."""
    for key in ("compile", "gpu_decode"):
        if getattr(train, key) and not use_gpu:
            raise ConfigError(f"train.{key}: needs GPU workers, and this cluster has no GPUs")


def build_config(tree: dict | None) -> JobConfig:
    try:
        return JobConfig.model_validate(tree or {})
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML preset (or start from defaults), apply overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        try:
            tree = _load_yaml(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return build_config(tree)
