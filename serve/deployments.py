"""The compute deployments of the serve app: a batched image embedder and a FAISS retriever.

They are composed behind the HTTP ingress by `serve.app:build_app`. Which model / index a
replica serves is its `user_config` (`{"model": uri}`, `{"model": uri, "index": uri}`),
so a new version is a config change that Serve applies in place through `reconfigure`,
without restarting replicas. On their own:

    model = {"model": "runs/quickstart/finetune/model"}
    handle = serve.run(EmbedderDeployment.options(user_config=model).bind())
    out = handle.embed.remote([png_bytes]).result()      # {"vectors", "model", "batches"}

    .venv/bin/python -m pytest -q tests/test_serve.py -k "embed_matches or embed_batches or search_by"
    .venv/bin/python -m pytest -q tests/test_serve_live.py -k "swap or killed or retriever"
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve

from system.data.transforms import decode_threads, eval_transform, images_to_tensor

log = logging.getLogger("ray.serve")


class VersionMismatch(ValueError):
    """Vectors from one model met an index (or prototypes) built from another; retry after a swap."""


class InvalidImage(ValueError):
    """A posted image whose header reads but whose payload does not decode (truncated, corrupt)."""


class PrefixDimError(ValueError):
    """A Matryoshka `dim` the index cannot search with (not trained, or not an inner-product index)."""


def prefix_queries(vectors: np.ndarray, dim: int | None, manifest: dict) -> np.ndarray:
    """Queries scored on their first `dim` dimensions only (Matryoshka prefix search).

    The prefix is renormalised (when the model normalises) and zero-padded to the index's
    dimension, so any inner-product index (Flat, IVF, HNSW, PQ, sharded) scores an item by
    the inner product of the query prefix with the item's first `dim` dimensions; no
    second index is needed. Vectors may come with `dim` or with all dimensions.
    """
    full = int(manifest["dim"])
    if dim is None or dim == full:
        return vectors
    trained = manifest.get("matryoshka_dims") or []
    if dim not in trained:
        raise PrefixDimError(
            f"dim {dim}: the model was trained with Matryoshka dims {trained or 'none'}; "
            f"use one of those or the full {full}"
        )
    if manifest["metric"] != "ip":  # zero-padding leaves L2 distances with the tail's norm in them
        metric = manifest["metric"]
        raise PrefixDimError(f"dim {dim}: prefix search needs an inner-product index, not {metric}")
    if vectors.shape[1] not in (dim, full):
        raise PrefixDimError(f"vectors: {vectors.shape[1]} dims; with dim {dim} send {dim} or {full}")
    prefix = vectors[:, :dim]
    if manifest.get("normalized", True):
        prefix = prefix / np.maximum(np.linalg.norm(prefix, axis=1, keepdims=True), 1e-12)
    padded = np.zeros((len(vectors), full), np.float32)
    padded[:, :dim] = prefix
    return padded


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


def decode_request(images: list[bytes], transform) -> np.ndarray:
    """images_to_tensor, or InvalidImage naming the first image that does not decode."""
    from system.data.dataset import check_image

    try:
        return images_to_tensor(images, transform, decode_threads())
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
        decode = functools.partial(decode_request, images, version.transform)
        tensor = torch.from_numpy(await asyncio.to_thread(decode))
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


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class RetrieverDeployment:
    """One index (or one shard of a sharded set), from user_config {"model", "index"}.

    Searches and the changes of an add or remove run on the replica's event loop without
    awaiting, so a search never sees a half-applied change. Only saving the changed index
    awaits (in a thread, so searches go on during a long write), under a lock that keeps
    the next change from touching the index while it is being written. A swap to another
    model's index keeps the previous index, so queries embedded by the previous model still
    find their match (two indexes in memory until the next swap).
    """

    def __init__(self, persist: bool = True):
        self.current, self.previous, self.refused = None, None, None
        self.persist = persist
        self.changing = asyncio.Lock()

    async def reconfigure(self, config: dict) -> None:
        from system.index import open_index
        from system.models.artifact import read_meta

        uri = config["index"]
        model = (await asyncio.to_thread(read_meta, config["model"])).get("fingerprint")
        if self.current is not None and self.current.uri == uri:  # a model-only swap: check the pair
            if self.current.fingerprint and model and self.current.fingerprint != model:
                built = self.current.fingerprint
                self.refused = f"index {uri} was built from model {built}, but model {model} is served"
                log.error("index does not match the new model: %s", self.refused)
            return
        index = await asyncio.to_thread(open_index, uri)
        if index.fingerprint and model and index.fingerprint != model:
            message = f"index {uri} was built from model {index.fingerprint}, but model {model} is served"
            if self.current is None:
                raise VersionMismatch(message)
            # Refused: keep serving the current version rather than fail the replica.
            log.error("refused index swap: %s", message)
            self.refused = message
            return
        # The previous index serves queries embedded by the previous model, until they drain;
        # a swap that keeps the model could never use it, so its memory is freed at once.
        keep = self.current is not None and index.fingerprint not in (None, self.current.fingerprint)
        self.previous, self.current, self.refused = self.current if keep else None, index, None

    async def info(self) -> dict:
        return {**self.current.info(), "uri": self.current.uri, "refused_swap": self.refused}

    def _index_for(self, fingerprint: str | None):
        for index in (self.current, self.previous):
            if index is not None and (fingerprint is None or index.fingerprint in (None, fingerprint)):
                return index
        raise VersionMismatch(f"no index for model {fingerprint} (serving {self.current.fingerprint})")

    async def search(
        self, vectors: np.ndarray, k: int, fingerprint: str | None = None, dim: int | None = None
    ) -> dict:
        """{"hits": top-k hits per query, "metric"}; `dim`: score on a prefix (prefix_queries).

        The metric comes with the hits because it says which way shards' scores merge, and
        a swap may change it between two requests.
        """
        index = self._index_for(fingerprint)
        hits = _hits(index, *index.search(prefix_queries(vectors, dim, index.manifest), k))
        return {"hits": hits, "metric": index.metric}

    async def search_by_id(self, ids: list[str], k: int, dim: int | None = None) -> list[list[dict]]:
        """Neighbours of indexed items; an unknown id raises system.index.api.IndexInputError."""
        index = self.current
        if dim is None:
            return _hits(index, *index.search_by_id(ids, k))
        return _hits(index, *index.search(prefix_queries(index.reconstruct(ids), dim, index.manifest), k))

    async def present(self, ids: list[str]) -> list[str]:
        """The ids of `ids` held by this shard."""
        return [i for i in ids if _has(self.current, i)]

    async def vectors(self, ids: list[str]) -> np.ndarray:
        return self.current.reconstruct(ids)

    async def upsert(
        self, ids: list[str], vectors: np.ndarray, metadata: list[dict] | None, fingerprint: str
    ):
        """Add, replacing ids already held; one call, so searches see all of it or none."""
        async with self.changing:
            return await self._upsert(ids, vectors, metadata, fingerprint)

    async def _upsert(self, ids, vectors, metadata, fingerprint) -> dict:
        index = self.current
        if index.fingerprint and index.fingerprint != fingerprint:
            raise VersionMismatch(f"items embedded by {fingerprint}, index built from {index.fingerprint}")
        replaced = [i for i in ids if _has(index, i)]
        if replaced:
            # Kept, so a rejected add (bad metadata, wrong dim) can put the old items back.
            old = (index.reconstruct(replaced), index.metadata(replaced))
            index.remove(replaced)
        try:
            index.add(ids, vectors, metadata)
        except Exception:
            if replaced:
                index.add(replaced, *old)
            raise
        count = len(index)
        await self._save(index)
        return {"replaced": len(replaced), "count": count}

    async def remove(self, ids: list[str]) -> dict:
        async with self.changing:
            index = self.current
            held = [i for i in ids if _has(index, i)]
            if held:
                index.remove(held)
                await self._save(index)
            return {"removed": len(held), "count": len(index)}

    async def _save(self, index) -> None:
        if self.persist:
            await asyncio.to_thread(index.save)


def _has(index, item_id: str) -> bool:
    from system.index import IndexInputError

    try:
        index.metadata([item_id])
    except IndexInputError:
        return False
    return True


def _hits(index, ids: list[list[str]], scores: np.ndarray) -> list[list[dict]]:
    # A row holds fewer ids than k when the index has fewer items; its scores are padding.
    flat_ids = [i for row in ids for i in row]
    metadata = iter(index.metadata(flat_ids) if flat_ids else [])
    return [
        [
            {"id": i, "score": float(s), "metadata": next(metadata)}
            for i, s in zip(row_ids, row_scores, strict=False)
        ]
        for row_ids, row_scores in zip(ids, scores, strict=True)
    ]
