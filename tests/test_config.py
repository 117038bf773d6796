"""Job configs: YAML presets + `--set dotted.key=value` overrides, one-line errors naming the key.

.venv/bin/python -m pytest -q tests/test_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from system.config import ConfigError, JobConfig, load_config

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def config_error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    return message


def test_there_are_presets():
    assert PRESETS, "configs/ holds no YAML presets"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load_and_round_trip(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, JobConfig)
    assert JobConfig.model_validate(cfg.model_dump()) == cfg
    assert cfg.train.epochs is not None or cfg.train.max_steps is not None


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == JobConfig()
    assert cfg.train.epochs == 1 and cfg.train.max_steps is None  # a length is always set
    assert load_config(None, ["train.max_steps=5"]).train.epochs is None


def test_overrides_apply_with_yaml_typing(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  lr: 0.002\n  workers: 2\nmodel:\n  name: resnet18\n  init: some/model\n")
    cfg = load_config(
        path,
        [
            "train.lr=3e-4",
            "train.workers=4",
            "train.use_gpu=false",
            "model.kwargs={img_size: 32, depths: [1, 2]}",
            "model.init=null",
            "data.limit=",
            "run.name=exp 1",
            "sweep.space={train.lr: {loguniform: [1e-4, 1e-2]}}",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.workers == 4 and isinstance(cfg.train.workers, int)
    assert cfg.train.use_gpu is False
    assert cfg.model.kwargs == {"img_size": 32, "depths": [1, 2]}
    assert cfg.model.name == "resnet18"  # a sibling of an overridden key is kept
    assert cfg.model.init is None and cfg.data.limit is None
    assert cfg.run.name == "exp 1"
    # 1e-4 without a dot is a float, not the string PyYAML's YAML 1.1 rules would give
    assert cfg.sweep.space == {"train.lr": {"loguniform": [1e-4, 1e-2]}}


def test_exponent_floats_in_yaml_files_are_floats(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep:\n  space:\n    train.lr: {loguniform: [1e-4, 1E-2]}\n")
    bounds = load_config(path).sweep.space["train.lr"]["loguniform"]
    assert bounds == [1e-4, 1e-2] and all(isinstance(b, float) for b in bounds)


def test_dotted_keys_below_free_form_mappings():
    cfg = load_config(
        None,
        [
            "sweep.space.train.lr={loguniform: [1e-4, 1e-2]}",
            "sweep.space.finetune.rank={choice: [4, 8]}",
            "model.kwargs.img_size=32",
        ],
    )
    assert cfg.sweep.space == {
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "finetune.rank": {"choice": [4, 8]},
    }
    assert cfg.model.kwargs == {"img_size": 32}


def test_empty_section_in_yaml_accepts_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n")  # every key commented out
    assert load_config(path, ["train.lr=0.01"]).train.lr == 0.01


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("trian.lr=1", "trian", "unknown key"),
        ("train.lrr=1", "train.lrr", "unknown key"),
        ("train.workers=abc", "train.workers", "integer"),
        ("train.workers=1.5", "train.workers", "integer"),
        ("train.workers=0", "train.workers", "greater than or equal to 1"),
        ("train.lr=-1", "train.lr", "greater than 0"),
        ("train.lr=100", "train.lr", "less than or equal to 10"),
        ("train.strategy=zero", "train.strategy", "'ddp' or 'fsdp'"),
        ("data.image_size=4", "data.image_size", "greater than or equal to 8"),
        ("train=5", "train", "dictionary"),
        ("seed.x=1", "seed", "integer"),
        ("model.kwargs=[1, 2]", "model.kwargs", "dictionary"),
        ("sweep.perturbation_interval=0", "sweep.perturbation_interval", "greater than or equal to 1"),
        ("sweep.scheduler=pb", "sweep.scheduler", "'asha', 'pbt' or 'fifo'"),
        ("finetune.closed_form=true", "finetune.closed_form", "needs finetune.method linear, not lora"),
        ("finetune.train_norms=true", "finetune.train_norms", "needs finetune.method svfit, not lora"),
        ("finetune.ridge=[]", "finetune.ridge", "at least 1 item"),
        ("finetune.ridge=[0.1, 0]", "finetune.ridge.1", "greater than 0"),
        ("finetune.ridge=abc", "finetune.ridge", "valid list"),
        ("finetune.target_modules=blocks.(qkv", "finetune.target_modules", "not a valid regular expression"),
        ("finetune.rank_pattern={'fc[': 4}", "finetune.rank_pattern", "not a valid regular expression"),
    ],
)
def test_bad_override_is_one_line_naming_the_key(override, key, words):
    message = config_error([override])
    assert message.startswith(f"{key}: "), message
    assert words in message, message


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", "train.=1"])
def test_bad_set_syntax(override):
    message = config_error([override])
    assert message.startswith("--set ") and repr(override) in message, message


def test_a_key_below_a_value_is_an_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("seed: 3\n")
    assert config_error(["seed.x=1"], path) == "seed.x: seed is not a section"


def test_unknown_key_in_the_file_names_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  lr: 0.1\n  batchsize: 8\n")
    assert config_error(path=path) == "train.batchsize: unknown key"


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert str(missing) in config_error(path=missing)
    assert "no such file" in config_error(path=missing)

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("train: {lr: 1\nmodel: [\n")
    message = config_error(path=invalid)
    assert str(invalid) in message and "not valid YAML" in message

    listing = tmp_path / "list.yaml"
    listing.write_text("- train\n- model\n")
    message = config_error(path=listing)
    assert str(listing) in message and "mapping" in message

    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    assert "mapping" in config_error(path=scalar)

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert str(binary) in config_error(path=binary)


def test_closed_form_linear_config():
    cfg = load_config(None, ["finetune.method=linear", "finetune.closed_form=true"])
    assert cfg.finetune.closed_form and cfg.finetune.ridge == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert load_config(None, ["finetune.method=linear", "finetune.ridge=0.5"]).finetune.ridge == [0.5]
    # The method is checked whichever order the keys come in.
    message = config_error(["finetune.closed_form=true", "finetune.method=full"])
    assert message.startswith("finetune.closed_form: ") and "linear" in message, message
    assert JobConfig.model_validate(cfg.model_dump()) == cfg


def test_round_trip_as_plain_dict_after_overrides():
    cfg = load_config(None, ["train.max_steps=7", "model.kwargs={img_size: 32}", "train.strategy=fsdp"])
    plain = cfg.model_dump()
    assert isinstance(plain["train"], dict) and plain["train"]["max_steps"] == 7
    assert JobConfig.model_validate(plain) == cfg


def test_checkpoint_policy_keeps_the_newest_or_the_best():
    from system.train import checkpoint_policy

    newest = checkpoint_policy(load_config(None, ["train.keep_last=3"]))
    assert newest.num_to_keep == 3 and newest.checkpoint_score_attribute is None
    lowest_loss = checkpoint_policy(load_config(None, ["train.keep_best=loss", "train.keep_last=1"]))
    assert (lowest_loss.checkpoint_score_attribute, lowest_loss.checkpoint_score_order) == ("loss", "min")
    every = ["train.keep_best=knn_acc", "train.eval_every=4", "train.checkpoint_every=8"]
    best_knn = checkpoint_policy(load_config(None, every))
    assert (best_knn.checkpoint_score_attribute, best_knn.checkpoint_score_order) == ("knn_acc", "max")


# A new objective, written as a user would write its file: options, validation, registration.
TOY_OBJECTIVE = """
from pydantic import Field, field_validator
from torch import nn

from system.objectives.registry import register_objective
from system.options import EXCLUSIVE, PERTURBABLE, Options


class ToyOptions(Options):
    toy_margin: float = Field(0.5, gt=0, description="margin of the toy loss", json_schema_extra=PERTURBABLE)
    toy_memory: bool = Field(False, description="keep a memory bank", json_schema_extra=EXCLUSIVE)

    @field_validator("toy_margin")
    @classmethod
    def _not_a_quarter(cls, value):
        if value == 0.25:
            raise ValueError("a quarter is reserved")
        return value


@register_objective("toy", options=ToyOptions, views=2)
class Toy(nn.Module):
    def __init__(self, embed_dim, cfg, num_classes=0, backbone=None):
        super().__init__()
        self.margin = cfg.toy_margin
"""

TOY_CHECKS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import toy_objective  # registers `toy` before system.config composes the sections

from repforge.cli import build_parser
from system.config import ConfigError, load_config
from system.objectives import get_objective
from tune.search import PBT_MUTABLE

def error(overrides):
    try:
        load_config(None, overrides)
    except ConfigError as err:
        return str(err)

try:
    build_parser().parse_args(["pretrain", "--help"])
except SystemExit:
    pass
cfg = load_config(None, ["objective.name=toy", "objective.toy_margin=0.75", "objective.toy_memory=true"])
print(json.dumps({
    "margin": get_objective("toy")(8, cfg.objective).margin,
    "range": error(["objective.toy_margin=-1"]),
    "validator": error(["objective.toy_margin=0.25"]),
    "exclusive": error(["objective.toy_memory=true"]),
    "pbt": "objective.toy_margin" in PBT_MUTABLE,
}))
"""


def test_a_new_objective_is_one_file_and_its_registration(tmp_path):
    """A new objective's options become keys: in --help, validated, refused with another objective,
    swept by PBT; nothing else is edited (this process's config is composed already: a fresh one)."""
    import json
    import subprocess
    import sys

    (tmp_path / "toy_objective.py").write_text(TOY_OBJECTIVE)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", TOY_CHECKS, str(tmp_path)], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    help_text, result = done.stdout, json.loads(done.stdout.splitlines()[-1])
    assert "objective.toy_margin: margin of the toy loss [toy]" in help_text
    assert "objective.name: " in help_text and "simclr | supervised | toy" in help_text
    assert result["margin"] == 0.75
    assert result["range"] == "objective.toy_margin: Input should be greater than 0"
    assert result["validator"] == "objective.toy_margin: Value error, a quarter is reserved"
    assert result["exclusive"] == "objective.toy_memory: needs objective.name toy, not simclr"
    assert result["pbt"]


def test_every_option_says_who_reads_it_and_help_lists_every_key():
    from repforge.commands.common import config_help
    from system.adapters import ADAPTERS
    from system.config import FinetuneConfig, ObjectiveConfig
    from system.objectives import OBJECTIVES

    text = config_help()
    for section, model, choice, registry in [
        ("objective", ObjectiveConfig, "name", OBJECTIVES),
        ("finetune", FinetuneConfig, "method", ADAPTERS),
    ]:
        for name in model.model_fields:
            assert f"  {section}.{name}: " in text
        for member, entry in registry.items():
            assert member in model.model_fields[choice].description
            for option in entry.options.model_fields if entry.options else ():
                assert member in model.model_fields[option].description, (member, option)
    # What a preset or a sweep over methods may set for all: kept, and ignored by the others.
    assert load_config(None, ["objective.name=supervised", "objective.proj_dim=64"]).objective.proj_dim == 64
    assert load_config(None, ["finetune.method=norm", "finetune.rank=16"]).finetune.rank == 16


def test_one_key_declared_by_two_options_classes_is_refused():
    from pydantic import Field

    from system.config import ObjectiveBase
    from system.objectives.simclr import SimclrOptions
    from system.options import Options, compose_section

    class Clash(Options):
        temperature: float = Field(0.5, description="another temperature")

    with pytest.raises(TypeError, match="objective.temperature: declared by"):
        compose_section(
            ObjectiveBase, "objective", "name", "objective", {"simclr": SimclrOptions, "x": Clash}
        )
    with pytest.raises(TypeError, match="objective.name: declared by"):

        class Name(Options):
            name: str = "x"

        compose_section(ObjectiveBase, "objective", "name", "objective", {"x": Name})
