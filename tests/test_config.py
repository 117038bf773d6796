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
