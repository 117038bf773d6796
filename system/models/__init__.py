"""Models stage: timm backbones and the model artifact (weights + model.json, DESIGN.md)."""

from system.models.artifact import (
    Embedder,
    ModelError,
    create_backbone,
    load_artifact,
    read_meta,
    save_model,
    write_artifact,
)

__all__ = [
    "Embedder",
    "ModelError",
    "create_backbone",
    "load_artifact",
    "read_meta",
    "save_model",
    "write_artifact",
]
