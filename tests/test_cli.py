"""The CLI contract: --help everywhere, and every bad input is one line on stderr with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from repforge.cli import build_parser, main

SUBCOMMANDS = [
    ["data", "ingest"],
    ["data", "info"],
    ["pretrain"],
    ["finetune"],
    ["sweep"],
    ["embed"],
    ["index", "build"],
    ["index", "search"],
    ["index", "eval"],
    ["serve"],
    ["runs", "show"],
    ["quickstart"],
]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: repforge" in capsys.readouterr().out


BAD_INPUTS = {
    "unknown key": (["pretrain", "--set", "train.lrr=1"], "train.lrr"),
    "wrong type": (["pretrain", "--set", "train.workers=abc"], "train.workers"),
    "out of range": (["finetune", "--set", "train.lr=-1"], "train.lr"),
    "bad --set": (["pretrain", "--set", "train.lr"], "train.lr"),
    "missing config": (["pretrain", "--config", "/nonexistent.yaml"], "--config"),
    "missing train data": (["pretrain", "--set", "data.train=/nonexistent"], "data.train"),
    "unknown model": (
        ["pretrain", "--config", "configs/quickstart.yaml", "--set", "model.name=nope"],
        "model.name",
    ),
    "unknown objective": (
        ["pretrain", "--config", "configs/quickstart.yaml", "--set", "objective.name=x"],
        "objective.name",
    ),
    "unknown method": (
        ["finetune", "--config", "configs/quickstart.yaml", "--set", "finetune.method=x"],
        "finetune.method",
    ),
    "targets match nothing": (
        ["finetune", "--config", "configs/quickstart.yaml", "--set", "finetune.target_modules=zzz"],
        "finetune.target_modules",
    ),
    "mae on a CNN": (
        ["pretrain", "--config", "configs/quickstart.yaml", "--set", "objective.name=mae"],
        "objective.name",
    ),
    "matryoshka dim too large": (
        ["pretrain", "--config", "configs/quickstart.yaml", "--set", "objective.matryoshka_dims=[8,4096]"],
        "objective.matryoshka_dims",
    ),
    "decreasing matryoshka dims": (
        ["pretrain", "--set", "objective.matryoshka_dims=[64,32]"],
        "objective",
    ),
    "keep_best off the eval steps": (
        ["pretrain", "--set", "train.keep_best=knn_acc", "--set", "train.checkpoint_every=5"],
        "keep_best",
    ),
    "keep_best val_acc without a head": (
        ["pretrain", "--config", "configs/quickstart.yaml", "--set", "train.keep_best=val_acc"],
        "train.keep_best",
    ),
    "balanced closed form": (
        [
            "finetune",
            "--config",
            "configs/quickstart.yaml",
            "--set",
            "finetune.method=linear",
            "--set",
            "finetune.closed_form=true",
            "--set",
            "data.balance=true",
        ],
        "data.balance",
    ),
    "data.train not parquet": (["finetune", "--set", "data.train=README.md"], "data.train: Parquet"),
    "no run to show": (["runs", "show", "/nonexistent-run"], "no metrics.jsonl"),
    "missing init": (
        ["finetune", "--config", "configs/quickstart.yaml", "--set", "model.init=/nope"],
        "model.init",
    ),
    "bad sweep space": (
        ["sweep", "--config", "configs/quickstart.yaml", "--set", "sweep.space={train.lr: {bogus: 1}}"],
        "train.lr",
    ),
    "embed missing model": (["embed", "--model", "/nope", "--data", "/nope", "--out", "/tmp/x"], "/nope"),
    "index missing embeddings": (["index", "build", "--embeddings", "/nope", "--out", "/tmp/x"], "/nope"),
    "index search no query": (["index", "search", "--index", "/nope"], "--id"),
    "index eval missing": (["index", "eval", "--index", "/nope"], "/nope"),
    "data info missing": (["data", "info", "/nope"], "/nope"),
    "ingest missing": (["data", "ingest", "/nope", "--out", "/tmp/x"], "/nope"),
    "serve missing model": (["serve", "--model", "/nope"], "/nope"),
    "serve bad limit": (["serve", "--model", "/nope", "--max-k", "0"], "max_k"),
    "quickstart bad set": (["quickstart", "--set", "train.bogus=1"], "train.bogus"),
}


@pytest.fixture(autouse=True)
def _at_project_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, capsys, digits_data):
    argv, named = BAD_INPUTS[case]
    if "--config" in argv and "configs/quickstart.yaml" in argv:
        # Real data, so that each case fails on the key it names and not on a missing dataset.
        argv = [*argv, "--set", f"data.train={digits_data[0]}", "--set", f"data.val={digits_data[1]}"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("repforge: error:") and named in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize(
    "setting, named",
    [
        ("train.use_gpu=true", "train.use_gpu: 2 workers need 2 GPUs"),
        ("train.workers=3", "train.cpus_per_worker"),
    ],
)
def test_workers_that_this_instance_cannot_hold_are_one_line_exit_2(
    setting, named, ray_local, digits_data, capsys, tmp_path
):
    """On the job's own local Ray instance (the tests': 2 CPUs, no GPU), Ray Train would wait
    for the workers' resources forever."""
    argv = [
        "finetune",
        "--config",
        "configs/quickstart.yaml",
        "--set",
        setting,
        "--set",
        "train.cpus_per_worker=1",
    ]
    argv += ["--set", f"data.train={digits_data[0]}", "--set", f"data.val={digits_data[1]}"]
    assert main([*argv, "--set", f"run.storage={tmp_path}", "--set", "finetune.method=full"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "cannot grow" in lines[0], lines


@pytest.mark.parametrize("damage", ["another model.name", "no weights", "garbled weights", "garbled json"])
def test_init_artifact_that_cannot_load_is_one_line_exit_2(damage, capsys, digits_data, tmp_path):
    """model.init is checked on the driver against the model it initialises, not in each worker."""
    from system.data.transforms import preprocessing_config
    from system.models.artifact import Embedder, create_backbone, save_model

    backbone = create_backbone("test_resnet", {})
    pre = preprocessing_config(backbone, 32)
    meta = {"timm_name": "test_resnet", "timm_kwargs": {}, "preprocessing": pre}
    artifact = tmp_path / "model"
    save_model(str(artifact), Embedder(backbone), meta)
    model_name = "resnet10t" if damage == "another model.name" else "test_resnet"
    if damage == "no weights":
        (artifact / "model.safetensors").unlink()
    if damage == "garbled weights":
        (artifact / "model.safetensors").write_bytes(b"\xff" * 64)
    if damage == "garbled json":
        (artifact / "model.json").write_text("{not json")
    argv = ["finetune", "--config", "configs/quickstart.yaml", "--set", f"model.init={artifact}"]
    argv += ["--set", f"model.name={model_name}", "--set", f"data.train={digits_data[0]}"]
    argv += ["--set", f"data.val={digits_data[1]}"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repforge: error: model.init:"), captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize(
    "argv",
    [
        ["index", "build", "--embeddings", "e", "--out", "o", "--shards", "0"],
        ["index", "eval", "--index", "i", "--queries", "0"],
        ["index", "search", "--index", "i", "--id", "a", "--k", "-1"],
        ["embed", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"],
    ],
    ids=lambda argv: argv[-2],
)
def test_counts_below_one_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert argv[-2] in last and "must be at least 1" in last, last


def test_module_entry_point_exit_code():
    """`python -m repforge.cli` (what `ray job submit` runs) has the same contract."""
    done = subprocess.run(
        [sys.executable, "-m", "repforge", "pretrain", "--set", "train.nope=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "repforge: error: train.nope: unknown key"


def test_a_table_that_is_not_the_dataset_is_one_line_before_ray(tmp_path, capsys, digits_data):
    """An embeddings folder, or unlabelled images where labels are needed, fail before any Ray work."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from system import storage

    table = pq.read_table(storage.parquet_files(digits_data[0]))
    (tmp_path / "emb").mkdir()
    (tmp_path / "unlabelled").mkdir()
    vectors = pa.array([[0.0, 1.0]] * 4, pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": table["id"][:4], "embedding": vectors}), tmp_path / "emb" / "part.parquet")
    pq.write_table(table.drop(["label"]), tmp_path / "unlabelled" / "part.parquet")
    quickstart = ["--config", "configs/quickstart.yaml", "--set", f"data.val={digits_data[1]}"]
    cases = [
        (["finetune", *quickstart, "--set", f"data.train={tmp_path / 'emb'}"], "embeddings folder"),
        (["pretrain", *quickstart, "--set", f"data.train={tmp_path / 'emb'}"], "column 'image' is missing"),
        (
            [
                "pretrain",
                *quickstart,
                "--set",
                "objective.name=supervised",
                "--set",
                f"data.train={tmp_path}/unlabelled",
            ],
            "column 'label' is missing",
        ),
    ]
    for argv, named in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("repforge: error: data.train: ") and named in err[0], err


def test_serve_flags_are_the_app_settings():
    """Every scalar AppArgs field is a `repforge serve` flag; unset ones keep the app's default."""
    from repforge.commands.serve import app_settings
    from serve.schemas import AppArgs

    args = build_parser().parse_args(
        ["serve", "--model", "m", "--max-k", "5", "--replica-cpus", "0.5", "--no-persist-items"]
    )
    settings = app_settings(args)
    assert settings == {"max_k": 5, "replica_cpus": 0.5, "persist_items": False}
    assert AppArgs(model="m", **settings).max_images == AppArgs(model="m").max_images
