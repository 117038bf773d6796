"""The compute deployments of the serve app: a batched image embedder and a FAISS retriever.

They are composed behind the HTTP ingress by `serve.app:build_app`; on their own:

    handle = serve.run(EmbedderDeployment.bind("runs/quickstart/finetune/model"))
    vectors = handle.embed.remote([png_bytes]).result()
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve

from system.transforms import eval_transform, images_to_tensor


def _images_in(items: list[torch.Tensor]) -> int:
    # Batches are sized in images, not requests: one request may carry many images.
    return sum(len(t) for t in items)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class EmbedderDeployment:
    """Loads a model artifact once; decodes and preprocesses per request, runs the model in batches."""

    def __init__(self, model_uri: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01):
        from system.models import load_artifact

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_artifact(model_uri, self.device)
        self.transform = eval_transform(self.meta["preprocessing"])
        # (Named so: an attribute called `classes` makes cloudpickle drag in torch.classes.)
        names = self.meta.get("classes") or []
        self.class_names = [names[i] if i < len(names) else str(i) for i in range(self.meta["num_classes"])]
        self.max_batch_size = max_batch_size
        for batched in (self._embed_batch, self._classify_batch):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def embed(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> embeddings [n, d] float32."""
        return await self._run(images, self._embed_batch)

    async def classify(self, images: list[bytes], k: int) -> list[list[dict]]:
        """Encoded images -> the top-k (label, softmax probability) of the head, per image."""
        probs = torch.from_numpy(await self._run(images, self._classify_batch))
        scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            [{"label": self.class_names[i], "score": float(s)} for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]

    async def _run(self, images: list[bytes], batched) -> np.ndarray:
        # Decoding and resizing stay off the event loop so the batcher keeps collecting.
        tensor = torch.from_numpy(await asyncio.to_thread(images_to_tensor, images, self.transform))
        # A request larger than one batch is split; each chunk queues like a small request.
        chunks = torch.split(tensor, self.max_batch_size)
        return np.concatenate(await asyncio.gather(*(batched(chunk) for chunk in chunks)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _embed_batch(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        return await asyncio.to_thread(self._forward, items, self.model.embed)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _classify_batch(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        return await asyncio.to_thread(self._forward, items, lambda x: self.model.classify(x).softmax(-1))

    @torch.inference_mode()
    def _forward(self, items: list[torch.Tensor], fn) -> list[np.ndarray]:
        batch = torch.cat(items).to(self.device)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            out = fn(batch).float().cpu().numpy()
        return np.split(out, np.cumsum([len(t) for t in items])[:-1])


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class RetrieverDeployment:
    """Opens a FAISS index once; answers k-nearest-neighbour queries with each hit's metadata."""

    def __init__(self, index_uri: str):
        from system.index import open_index

        self.index = open_index(index_uri)

    def info(self) -> dict:
        return self.index.info()

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        return self._hits(*self.index.search(vectors, k))

    def search_by_id(self, ids: list[str], k: int) -> list[list[dict]]:
        """Neighbours of indexed items; an unknown id raises system.index.IndexInputError."""
        return self._hits(*self.index.search_by_id(ids, k))

    def _hits(self, ids: list[list[str]], scores: np.ndarray) -> list[list[dict]]:
        # A row holds fewer ids than k when the index has fewer items; its scores are padding.
        flat_ids = [i for row in ids for i in row]
        metadata = iter(self.index.metadata(flat_ids) if flat_ids else [])
        return [
            [
                {"id": i, "score": float(s), "metadata": next(metadata)}
                for i, s in zip(row_ids, row_scores, strict=False)
            ]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]
