"""Pretraining and LoRA fine-tuning, checked on the artifacts of the real quickstart run.

The quickstart (tests/conftest.py::quickstart_run) trains with Ray Train on 2 gloo
workers; these tests check what it wrote against the contracts and against
computations done here in-process.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from system import storage
from system.data.transforms import eval_transform, images_to_tensor
from system.embed.batch import embed_images
from system.metrics import knn_accuracy
from system.models.artifact import (
    Embedder,
    create_backbone,
    fingerprint_file,
    load_artifact,
    load_backbone_weights,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(quickstart_run):
    storage_root, done = quickstart_run
    assert done.returncode == 0, done.stderr[-3000:]
    return storage_root / "quickstart"


@pytest.fixture(scope="module")
def held_out(quickstart_run):
    storage_root, _ = quickstart_run
    table = pq.read_table(storage.parquet_files(str(storage_root / "datasets" / "digits" / "test"))[0])
    return table.column("image").to_pylist(), torch.tensor(table.column("label").to_pylist())


def test_pretrain_artifact_contract(runs):
    folder = runs / "pretrain" / "model"
    meta = json.loads((folder / "model.json").read_text())
    assert meta["fingerprint"] == fingerprint_file(folder / "model.safetensors")
    assert meta["embedding_dim"] == 96 and meta["normalize"] is True
    assert meta["preprocessing"]["size"] == 32 and meta["config"]["objective"]["name"] == "simclr"
    last = json.loads((runs / "pretrain" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == meta["metrics"]["step"] > 0 and np.isfinite(last["loss"])


def test_pretraining_learned_something(runs, held_out):
    """kNN accuracy of SimCLR features beats the same network at random init, measured here."""
    images, labels = held_out
    model, meta = load_artifact(str(runs / "pretrain" / "model"))
    torch.manual_seed(0)
    random_init = Embedder(create_backbone("test_resnet", {})).eval()
    trained = knn_accuracy(torch.from_numpy(embed_images(model, meta["preprocessing"], images)), labels)
    baseline = knn_accuracy(
        torch.from_numpy(embed_images(random_init, meta["preprocessing"], images)), labels
    )
    assert trained > baseline + 0.05, (trained, baseline)


def test_merged_model_equals_adapter_on_base(runs, held_out):
    """The merged artifact computes what base weights + peft adapter + head compute (1e-4)."""
    from peft import PeftModel

    images, _ = held_out
    adapter = runs / "finetune" / "adapter"
    merged, meta = load_artifact(str(runs / "finetune" / "model"))
    assert meta["classes"] == [str(i) for i in range(10)] and meta["num_classes"] == 10
    assert 0 < meta["metrics"]["trainable_params"] < meta["metrics"]["total_params"] / 2
    base = create_backbone("test_resnet", {})
    load_backbone_weights(base, str(runs / "pretrain" / "model"))
    adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
    head = torch.nn.Linear(96, 10)
    head.load_state_dict(torch.load(adapter / "head.pt"))
    batch = torch.from_numpy(images_to_tensor(images[:64], eval_transform(meta["preprocessing"])))
    with torch.no_grad():
        assert torch.allclose(merged.classify(batch), head(adapted(batch)), atol=1e-4)
        pretrained, _ = load_artifact(str(runs / "pretrain" / "model"))
        # LoRA did change the backbone: the merged features differ from the pretrained ones.
        assert not torch.allclose(merged.backbone(batch), pretrained.backbone(batch), atol=1e-3)


def test_continuing_a_run_with_another_adapter_is_refused(runs):
    """`finetune` again under the same run.name continues that run from its checkpoints; with
    another method they cannot load, so it stops at one line, before any Ray work."""
    from system.config import ConfigError, build_config
    from system.train import run_training
    from system.train.run_record import CONFIG_FILE

    tree = json.loads((runs / "finetune" / CONFIG_FILE).read_text())  # written when it started
    assert tree.pop("classes") == [str(i) for i in range(10)]
    tree["finetune"]["method"] = "svfit"
    with pytest.raises(ConfigError, match=r"finetune run .*\(finetune.method: 'lora' -> 'svfit'\)"):
        run_training(build_config(tree), "finetune")
