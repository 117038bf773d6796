"""The finished run's artifacts: exported into the final checkpoint by rank 0, published by the driver.

{run.storage}/{run.name}/model     the model artifact (DESIGN.md), adapters merged in
{run.storage}/{run.name}/adapter   fine-tunes with an adapter method: the adapter alone, and the head
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from system import storage
from system.adapters.registry import get_adapter
from system.config import JobConfig
from system.models.artifact import Embedder, write_artifact
from system.train.module import build_model
from system.train.runs import write_confusion_png


def export_artifacts(folder: Path, state: dict, cfg: JobConfig, job: str, meta: dict, num_classes: int):
    """Write the finished artifacts into a checkpoint folder: model/ and, for fine-tunes, adapter/.

    `state` is the full (unsharded) state dict; it is loaded into a fresh unwrapped module,
    so DDP and FSDP runs export the same way.
    """
    module = build_model(cfg, job, num_classes)
    module.load_state_dict(state)
    backbone = module.backbone
    head = getattr(module.objective, "head", None)
    if job == "finetune":
        method = get_adapter(cfg.finetune.method)
        if method.save_adapter is not None:
            (folder / "adapter").mkdir()
            method.save_adapter(backbone, folder / "adapter")
            head_state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
            torch.save(head_state, folder / "adapter" / "head.pt")
            (folder / "adapter" / "adapter.json").write_text(json.dumps(meta, indent=2, default=str))
        backbone = method.export(backbone)
    embedder = Embedder(backbone, num_classes=head.out_features if head is not None else 0)
    if head is not None:
        embedder.head.load_state_dict(head.state_dict())
    (folder / "model").mkdir()
    write_artifact(folder / "model", embedder, meta)


def publish_result(result, cfg: JobConfig, job: str, run_name: str) -> dict[str, str]:
    """Copy the final checkpoint's artifacts to `{storage}/{run}/model` (and `/adapter`)."""
    run_uri = storage.join(storage.normalize(cfg.run.storage), run_name)
    published = {}
    with result.checkpoint.as_directory() as folder:
        for name in ("adapter", "model"):
            if (Path(folder) / name).is_dir():
                uri = storage.join(run_uri, name)
                with storage.publish_dir(uri, overwrite=True) as staging:
                    shutil.copytree(Path(folder) / name, staging, dirs_exist_ok=True)
                published[name] = uri
        model_json = Path(folder) / "model" / "model.json"
        if model_json.is_file():
            write_confusion_png(run_uri, json.loads(model_json.read_text()))
    return published
