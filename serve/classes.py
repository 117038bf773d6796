"""Training-free classifiers on the served embeddings: live class prototypes and kNN votes.

Prototypes: a class is the mean of its example embeddings (re-normalised); an image gets
the classes whose prototypes are most cosine-similar. Classes are added and removed live
(POST/DELETE /v1/classes) and persisted as one JSON file, keyed by model fingerprint, so
prototypes of one model are never compared with embeddings of another and a swap back
finds its classes again. One replica holds them (writes must not diverge).

kNN vote: the labels (the index's `label` passthrough column) of an image's nearest
indexed items vote; the score is the fraction of votes.

    .venv/bin/python -m pytest -q tests/test_serve_live.py -k "classes or class_changes or knn"
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import numpy as np
from ray import serve

from serve.errors import VersionMismatch
from system import storage


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


# Ids of the latest changes, kept with the classes: a change that the ingress retries (its
# reply was lost with a replica that had already saved it) is recognised and not applied twice.
REMEMBERED_CHANGES = 1024


def load_classes(uri: str | None) -> tuple[dict, list[str]]:
    """({fingerprint: {name: {"sum", "count"}}}, ids of the latest changes) from `uri` (empty when absent)."""
    if not uri or not storage.exists(uri):
        return {}, []
    raw = json.loads(storage.read_bytes(uri))
    classes = {
        fp: {
            name: {"sum": np.asarray(c["sum"], np.float32), "count": int(c["count"])}
            for name, c in cls.items()
        }
        for fp, cls in raw["models"].items()
    }
    return classes, raw.get("applied", [])


def classes_json(classes: dict, applied: list[str]) -> bytes:
    raw = {
        "models": {
            fp: {name: {"sum": c["sum"].tolist(), "count": c["count"]} for name, c in cls.items()}
            for fp, cls in classes.items()
        },
        "applied": applied[-REMEMBERED_CHANGES:],
    }
    return json.dumps(raw).encode()


def nearest_prototypes(vectors: np.ndarray, classes: dict, k: int) -> list[list[dict]]:
    names = sorted(classes)
    prototypes = _unit(np.stack([classes[n]["sum"] for n in names]))
    sims = _unit(vectors.astype(np.float32)) @ prototypes.T
    top = np.argsort(-sims, axis=1)[:, :k]
    return [[{"label": names[j], "score": float(row[j])} for j in order] for row, order in zip(sims, top)]


def knn_vote(hits: list[list[dict]], class_names: list[str], k: int) -> list[list[dict]]:
    """Top-k labels by the fraction of an image's neighbours that carry them."""

    def name(label) -> str:
        if isinstance(label, int) and 0 <= label < len(class_names):
            return class_names[label]
        return str(label)

    out = []
    for row in hits:
        votes = Counter(name(h["metadata"]["label"]) for h in row if h["metadata"].get("label") is not None)
        total = sum(votes.values()) or 1
        out.append([{"label": label, "score": n / total} for label, n in votes.most_common(k)])
    return out


# A short health check period: a dead store is replaced (and reloads its file) within seconds.
@serve.deployment(
    num_replicas=1, max_ongoing_requests=64, health_check_period_s=2, ray_actor_options={"num_cpus": 0}
)
class ClassesDeployment:
    """The live classes of every model served so far, persisted to `uri` after each change."""

    def __init__(self, uri: str | None):
        self.uri = storage.normalize(uri) if uri else None
        self.classes, self.applied = load_classes(self.uri)
        self._writing = asyncio.Lock()  # one write at a time, each with the state at its start

    async def list(self, fingerprint: str) -> list[dict]:
        return [
            {"name": n, "examples": c["count"]} for n, c in sorted(self.classes.get(fingerprint, {}).items())
        ]

    async def add(self, name: str, vectors: np.ndarray, fingerprint: str, change_id: str = "") -> list[dict]:
        """Add examples to class `name` (created if new); a `change_id` already applied is a no-op."""
        if change_id and change_id in self.applied:
            return await self.list(fingerprint)
        per_model = self.classes.setdefault(fingerprint, {})
        entry = per_model.setdefault(name, {"sum": np.zeros(vectors.shape[1], np.float32), "count": 0})
        if entry["sum"].shape != vectors.shape[1:]:
            raise VersionMismatch(f"class {name!r} holds {entry['sum'].shape[0]}-d vectors")
        # Unit vectors first, so every example weighs the same in the mean.
        entry["sum"] = entry["sum"] + _unit(vectors.astype(np.float32)).sum(axis=0)
        entry["count"] += len(vectors)
        await self._save(change_id)
        return await self.list(fingerprint)

    async def remove(self, name: str, fingerprint: str, change_id: str = "") -> bool:
        """Remove class `name`: False when there is none (True for a `change_id` already applied)."""
        if change_id and change_id in self.applied:
            return True
        if name not in self.classes.get(fingerprint, {}):
            return False
        del self.classes[fingerprint][name]
        await self._save(change_id)
        return True

    async def classify(self, vectors: np.ndarray, fingerprint: str, k: int) -> list[list[dict]]:
        classes = self.classes.get(fingerprint)
        if not classes:
            raise LookupError(f"no live classes for model {fingerprint}: add some with POST /v1/classes")
        return nearest_prototypes(vectors, classes, k)

    async def _save(self, change_id: str) -> None:
        if change_id:
            self.applied = [*self.applied[-(REMEMBERED_CHANGES - 1) :], change_id]
        if self.uri:
            async with self._writing:
                # Serialised on the event loop (no add can interleave), written off it.
                data = classes_json(self.classes, self.applied)
                await asyncio.to_thread(storage.write_bytes, self.uri, data)
