"""timm backbones and the model artifact.

A model artifact is a folder with `model.safetensors` and `model.json`: the timm name
and kwargs, embedding dim, Matryoshka dims, preprocessing, whether embeddings are
L2-normalised, training config, metrics, the class names of an optional linear head,
and a fingerprint (hash of the weights file) that later stages check against.

    python -c "from system.models.artifact import load_artifact; m, meta = load_artifact('runs/x/model')"
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from system import storage

WEIGHTS = "model.safetensors"
META = "model.json"


class ModelError(ValueError):
    """A user error about a model name, kwargs or artifact: the message is one line."""


def create_backbone(name: str, kwargs: dict | None = None, pretrained: bool = False) -> nn.Module:
    """A timm model that returns pooled features (num_classes=0)."""
    import timm

    if not timm.is_model(name):
        raise ModelError(f"model.name: unknown timm model {name!r}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **(kwargs or {}))
    except TypeError as err:
        raise ModelError(f"model.kwargs: {err}") from None


class Embedder(nn.Module):
    """A backbone plus an optional linear classification head on the pooled embedding."""

    def __init__(self, backbone: nn.Module, num_classes: int = 0, normalize: bool = True):
        super().__init__()
        self.backbone = backbone
        self.normalize = normalize
        self.head = nn.Linear(backbone.num_features, num_classes) if num_classes else None

    @property
    def dim(self) -> int:
        return self.backbone.num_features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return nn.functional.normalize(features, dim=-1) if self.normalize else features

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ModelError("this model artifact has no classification head")
        return self.head(self.backbone(images))


def fingerprint_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def same_model(a: str | None, b: str | None) -> bool:
    """Whether vectors from models with fingerprints `a` and `b` may meet (search, add, serve):
    the same model, or either unknown (artifacts and indexes written without a fingerprint
    are not refused). The one rule every stage applies."""
    return not a or not b or a == b


def write_artifact(folder: Path, model: Embedder, meta: dict) -> dict:
    """Write weights + model.json into an existing local folder; returns the full meta."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    meta = {
        **meta,
        "embedding_dim": model.dim,
        "normalize": model.normalize,
        "num_classes": model.head.out_features if model.head is not None else 0,
        "fingerprint": fingerprint_file(folder / WEIGHTS),
    }
    (folder / META).write_text(json.dumps(meta, indent=2, default=str))
    return meta


def read_meta(uri: str) -> dict:
    folder = storage.download_dir(uri)
    path = folder / META
    if not path.is_file():
        raise ModelError(f"not a model artifact (no {META}): {uri}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{META} of {uri} is not valid JSON ({err})") from None


def check_backbone_weights(backbone: nn.Module, folder: str, meta: dict) -> None:
    """ModelError (one line) unless the backbone weights of the artifact in local `folder`
    (`meta`: its model.json) load into `backbone`. Reads names and shapes from the
    safetensors header, not the weights."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ModelError(f"no {WEIGHTS} in the model artifact {folder}")
    try:
        with safe_open(str(path), "pt") as weights:
            prefix = "backbone."
            found = {
                name[len(prefix) :]: list(weights.get_slice(name).get_shape())
                for name in weights.keys()
                if name.startswith(prefix)
            }
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{WEIGHTS} of {folder} cannot be read ({err})") from None
    wanted = {name: list(value.shape) for name, value in backbone.state_dict().items()}
    wrong = [
        f"{name} is {found[name]} there, {shape} here"
        for name, shape in wanted.items()
        if found.get(name, shape) != shape
    ]
    missing = [f"no {n} there" for n in wanted if n not in found]
    extra = [f"{n} is not in this model" for n in found if n not in wanted]
    problems = wrong + missing + extra
    if problems:
        raise ModelError(
            f"the weights of {folder} (a {meta.get('timm_name', '?')}) do not fit this model: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )


def load_artifact(uri: str, device: str | torch.device = "cpu") -> tuple[Embedder, dict]:
    """Rebuild the Embedder from an artifact folder (no weight download: timm pretrained=False)."""
    folder = storage.download_dir(uri)
    meta = read_meta(str(folder))
    backbone = create_backbone(meta["timm_name"], meta.get("timm_kwargs", {}))
    model = Embedder(backbone, meta.get("num_classes", 0), meta.get("normalize", True))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    model = model.to(device).eval()
    if torch.device(device).type == "cuda":
        # bf16 convolutions run faster channels-last (resnet50 on an H100: x1.40, benchmarks/
        # bench_gpu.py); ViTs are unaffected. Outputs are the same up to rounding.
        model = model.to(memory_format=torch.channels_last)
    return model, meta


def load_backbone_weights(backbone: nn.Module, uri: str) -> dict:
    """Initialise `backbone` from an artifact's backbone weights (model.init); returns its meta."""
    folder = storage.download_dir(uri)
    meta = read_meta(str(folder))
    state = load_file(str(folder / WEIGHTS))
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return meta


def save_model(uri: str, model: Embedder, meta: dict, overwrite: bool = False) -> dict:
    """Publish a model artifact at `uri` atomically; `meta` needs timm_name, timm_kwargs, preprocessing."""
    with storage.publish_dir(uri, overwrite=overwrite) as staging:
        return write_artifact(staging, model, meta)
