"""The batched image embedder of the serve app (also the classifier, when the model has a head).

Composed behind the HTTP ingress by `serve.app:build_app`. Which model a replica serves is
its `user_config` (`{"model": uri}`), so a new version is a config change that Serve
applies in place through `reconfigure`, without restarting replicas. On its own:

    model = {"model": "runs/quickstart/finetune/model"}
    handle = serve.run(EmbedderDeployment.options(user_config=model).bind())
    out = handle.embed.remote([png_bytes]).result()      # {"vectors", "model", "batches"}

    .venv/bin/python -m pytest -q tests/test_serve.py -k "embed_matches or embed_batches"
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve

from serve.errors import InvalidImage, VersionMismatch
from system.data.device_decode import images_to_device
from system.data.transforms import decode_threads, eval_transform

log = logging.getLogger("ray.serve")


@dataclass(frozen=True, eq=False)
class ModelVersion:
    """Everything one request needs from a model, taken once so a swap cannot change it midway."""

    uri: str
    model: torch.nn.Module
    meta: dict
    transform: object
    class_names: list[str]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def load_version(uri: str, device: str) -> ModelVersion:
    from system.models.artifact import load_artifact

    model, meta = load_artifact(uri, device)
    names = meta.get("classes") or []
    class_names = [names[i] if i < len(names) else str(i) for i in range(meta.get("num_classes", 0))]
    return ModelVersion(uri, model, meta, eval_transform(meta["preprocessing"]), class_names)


def decode_request(images: list[bytes], transform, device: str = "cpu") -> torch.Tensor:
    """images_to_device (JPEGs decoded on a GPU replica's GPU), or InvalidImage naming the first
    image that does not decode."""
    from system.data.dataset import check_image

    try:
        return images_to_device(images, transform, device, decode_threads())
    except Exception:
        for i, data in enumerate(images):
            reason = check_image(data)
            if reason is not None:
                raise InvalidImage(f"image {i}: {reason}") from None
        raise  # every image decodes: the failure is ours, not the input's


def _images_in(items: list[tuple]) -> int:
    # Batches are sized in images, not requests: one request may carry many images.
    return sum(len(tensor) for _, tensor in items)


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # outside a replica (a plain Python call in a test)
        return ""


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class EmbedderDeployment:
    """Loads a model artifact (user_config); decodes per request, runs the model in batches."""

    def __init__(self, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.version: ModelVersion | None = None
        self.max_batch_size = max_batch_size
        for batched in (self._embed_batch, self._classify_batch):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def reconfigure(self, config: dict) -> None:
        """Load `config["model"]` beside the current one, then switch; requests in flight keep theirs."""
        uri = config["model"]
        if self.version is not None and self.version.uri == uri:
            return
        version = await asyncio.to_thread(load_version, uri, self.device)
        log.info("model %s -> %s", self.version and self.version.fingerprint, version.fingerprint)
        self.version = version

    def info(self) -> dict:
        return {**self.version.meta, "replica": _replica_name()}

    async def embed(self, images: list[bytes]) -> dict:
        """Encoded images -> {"vectors": [n, d] float32, "model": fingerprint, "batches": [sizes]}."""
        version = self.version
        vectors, batches = await self._run(version, images, self._embed_batch)
        return {"vectors": vectors, "model": version.fingerprint, "batches": batches}

    async def classify(self, images: list[bytes], k: int) -> dict:
        """Encoded images -> the top-k (label, softmax probability) of the head, per image."""
        version = self.version
        if not version.class_names:
            raise VersionMismatch(f"model {version.fingerprint} has no classification head")
        probs, batches = await self._run(version, images, self._classify_batch)
        scores, indices = torch.from_numpy(probs).topk(min(k, probs.shape[1]), dim=1)
        predictions = [
            [{"label": version.class_names[i], "score": float(s)} for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]
        return {"predictions": predictions, "model": version.fingerprint, "batches": batches}

    async def _run(self, version: ModelVersion, images: list[bytes], batched) -> tuple[np.ndarray, list[int]]:
        # Decoding and resizing stay off the event loop so the batcher keeps collecting. This is
        # each image's only full decode (the ingress reads headers only); a bad one fails just
        # this request, before it joins a batch.
        decode = functools.partial(decode_request, images, version.transform, self.device)
        tensor = await asyncio.to_thread(decode)
        # A request larger than one batch is split; each chunk queues like a small request.
        chunks = torch.split(tensor, self.max_batch_size)
        outs = await asyncio.gather(*(batched((version, chunk)) for chunk in chunks))
        # Each batch's size comes back with its first item only, so it is counted once.
        return np.concatenate([out for out, _ in outs]), [size for _, size in outs if size]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _embed_batch(self, items: list[tuple]) -> list[tuple]:
        return await asyncio.to_thread(self._forward, items, lambda v, x: v.model.embed(x))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _classify_batch(self, items: list[tuple]) -> list[tuple]:
        return await asyncio.to_thread(self._forward, items, lambda v, x: v.model.classify(x).softmax(-1))

    @torch.inference_mode()
    def _forward(self, items: list[tuple], fn) -> list[tuple]:
        # Items queued just before and after a swap may share a batch: one forward per version.
        outs: list = [None] * len(items)
        for version in {id(v): v for v, _ in items}.values():
            picks = [i for i, (v, _) in enumerate(items) if v is version]
            batch = torch.cat([items[i][1] for i in picks]).to(self.device)
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
                out = fn(version, batch).float().cpu().numpy()
            for i, part in zip(picks, np.split(out, np.cumsum([len(items[i][1]) for i in picks])[:-1])):
                outs[i] = part
        return [(out, _images_in(items) if i == 0 else 0) for i, out in enumerate(outs)]
