"""The FAISS retriever of the serve app: one index (or one shard of a sharded set) per deployment.

Composed behind the HTTP ingress by `serve.app:build_app`; which index it serves is its
`user_config` ({"model", "index"}), swapped in place through `reconfigure`. It is the one
writer of its index: live items (POST/DELETE /v1/items) change it here, are saved here, and
reach the ingress replicas that search a copy of the index themselves (serve.local_index)
through `snapshot` and `changes_since`.

    .venv/bin/python -m pytest -q tests/test_serve_live.py -k "swap or retriever or items"
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import deque

import numpy as np
from ray import serve

from serve.errors import UnknownItem, VersionMismatch
from serve.search import has, hits, prefix_queries, run_search
from system import storage
from system.compat import CompatError, serving_gate
from system.models.artifact import same_model

log = logging.getLogger("ray.serve")
CHANGE_LOG = 512  # changes kept for copies to catch up; a copy further behind takes a snapshot
MEMORY = "memory:"  # source_uri of a live item's image kept in memory (persist_items off)


def item_image_uri(index_uri: str, item_id: str) -> str:
    """Where a live item's image is stored: beside the index folder (which is replaced whole on save)."""
    return storage.join(index_uri + ".items", hashlib.sha256(item_id.encode()).hexdigest()[:32] + ".img")


@serve.deployment(max_ongoing_requests=64, health_check_period_s=2, ray_actor_options={"num_cpus": 0})
class RetrieverDeployment:
    """One index from user_config {"model", "index"}.

    Searches and the changes of an add or remove run on the replica's event loop without
    awaiting, so a search never sees a half-applied change. Only saving the changed index
    awaits (in a thread, so searches go on during a long write), under a lock that keeps
    the next change from touching the index while it is being written. A swap to another
    model's index keeps the previous index, so queries embedded by the previous model still
    find their match (two indexes in memory until the next swap).
    """

    def __init__(self, persist: bool = True):
        self.current, self.previous, self.refused = None, None, None
        self.gate = None  # system.compat Gate: another model's queries allowed on this index
        self.persist = persist
        self.changing = asyncio.Lock()
        self.images: dict[str, bytes] = {}  # live items' images when not persisted
        self.epoch, self.version, self.log = "", 0, deque(maxlen=CHANGE_LOG)

    async def reconfigure(self, config: dict) -> None:
        from system.index import open_index
        from system.models.artifact import read_meta

        uri = config["index"]
        model = (await asyncio.to_thread(read_meta, config["model"])).get("fingerprint")
        if self.current is not None and self.current.uri == uri:  # a model-only swap: check the pair
            try:
                self.gate = await asyncio.to_thread(
                    serving_gate, config.get("compat"), self.current.fingerprint, model
                )
            except CompatError as err:
                self.refused = f"index {uri} was {err}"
                log.error("index does not match the new model: %s", self.refused)
            return
        index = await asyncio.to_thread(open_index, uri)
        try:
            gate = await asyncio.to_thread(serving_gate, config.get("compat"), index.fingerprint, model)
        except CompatError as err:
            message = f"index {uri} was {err}"
            if self.current is None:
                raise VersionMismatch(message) from None
            # Refused: keep serving the current version rather than fail the replica.
            log.error("refused index swap: %s", message)
            self.refused = message
            return
        # The previous index serves queries embedded by the previous model, until they drain;
        # a swap that keeps the model could never use it, so its memory is freed at once.
        keep = self.current is not None and index.fingerprint not in (None, self.current.fingerprint)
        self.previous, self.current, self.refused = self.current if keep else None, index, None
        self.gate = gate
        self.epoch, self.version = uuid.uuid4().hex, 0  # copies of the old index start over
        self.log.clear()

    async def info(self) -> dict:
        from serve.search import filterable_columns

        current = self.current
        return {
            **current.info(),
            "uri": current.uri,
            "refused_swap": self.refused,
            "compat": self.gate.info() if self.gate is not None else None,
            "filterable": filterable_columns(current),
        }

    def _index_for(self, fingerprint: str | None):
        gate = self.gate
        if gate is not None and fingerprint == gate.new and self.current.fingerprint == gate.old:
            return self.current
        for index in (self.current, self.previous):
            if index is not None and same_model(fingerprint, index.fingerprint):
                return index
        raise VersionMismatch(f"no index for model {fingerprint} (serving {self.current.fingerprint})")

    async def search(
        self,
        vectors: np.ndarray,
        k: int,
        fingerprint: str | None = None,
        dim: int | None = None,
        filter: dict | None = None,
    ) -> dict:
        """{"hits": top-k hits per query, "metric"}; `dim`: score on a prefix (prefix_queries).

        The metric comes with the hits because it says which way shards' scores merge, and
        a swap may change it between two requests.
        """
        index, gate = self._index_for(fingerprint), self.gate
        if gate is not None and fingerprint == gate.new and index.fingerprint == gate.old:
            vectors = gate.queries(vectors)  # the new model's queries, in the old index's space
        found = run_search(index, prefix_queries(vectors, dim, index.manifest), k, filter)
        return {"hits": hits(index, *found), "metric": index.metric}

    async def search_by_id(
        self, ids: list[str], k: int, dim: int | None = None, filter: dict | None = None
    ) -> list[list[dict]]:
        """Neighbours of indexed items; an unknown id raises system.index.IndexInputError."""
        index = self.current
        queries = prefix_queries(index.reconstruct(ids), dim, index.manifest)
        return hits(index, *run_search(index, queries, k, filter))

    async def present(self, ids: list[str]) -> list[str]:
        """The ids of `ids` held by this shard."""
        return [i for i in ids if has(self.current, i)]

    async def vectors(self, ids: list[str]) -> np.ndarray:
        return self.current.reconstruct(ids)

    async def image_source(self, item_id: str) -> dict:
        """Where the image of an indexed item is: {"uri", "row"} (-1: the whole file), or {"data"}."""
        if not has(self.current, item_id):
            raise UnknownItem(f"unknown id: {item_id}")
        meta = self.current.metadata([item_id])[0]
        if meta.get("source_uri") == MEMORY:
            return {"data": self.images.get(item_id)}
        if not meta.get("source_uri"):
            raise UnknownItem(f"item {item_id}: the index records no image source for it")
        row = meta.get("source_row")  # row 0 is a row: only a missing row means "the whole file"
        return {"uri": meta["source_uri"], "row": -1 if row is None else int(row)}

    # -- the copies' feed -------------------------------------------------------------

    async def snapshot(self) -> dict | None:
        """The whole current index (serialised) at a version; None when it cannot travel (on disk)."""
        import faiss

        index = self.current
        if index.manifest.get("on_disk"):
            return None
        return {
            "epoch": self.epoch,
            "version": self.version,
            "shards": [faiss.serialize_index(s) for s in index.shards],
            "idmap": index.idmap,
            "shard_of_row": index._shard,
            "manifest": index.manifest,
            "uri": index.uri,
        }

    async def changes_since(self, epoch: str, version: int) -> dict:
        """The changes after `version` of index `epoch`, or {"reload": True} when a snapshot is needed."""
        if epoch != self.epoch or (version < self.version and (not self.log or self.log[0][0] > version + 1)):
            return {"epoch": self.epoch, "reload": True}
        return {
            "epoch": self.epoch,
            "version": self.version,
            "changes": [c for c in self.log if c[0] > version],
        }

    def _logged(self, op: str, *args) -> None:
        self.version += 1
        self.log.append((self.version, op, *args))

    # -- live items --------------------------------------------------------------------

    async def upsert(
        self,
        ids: list[str],
        vectors: np.ndarray,
        metadata: list[dict] | None,
        fingerprint: str,
        images: list[bytes] | None = None,
    ):
        """Add, replacing ids already held; one call, so searches see all of it or none."""
        async with self.changing:
            if images is not None:
                metadata = await self._store_images(ids, images, metadata)
            return await self._upsert(ids, vectors, metadata, fingerprint)

    async def _store_images(self, ids, images, metadata) -> list[dict]:
        # Stored before the index changes: an item is never found without its image.
        sources = []
        for item_id, data in zip(ids, images, strict=True):
            if self.persist and self.current.uri:
                uri = item_image_uri(self.current.uri, item_id)
                await asyncio.to_thread(storage.write_bytes, uri, data)
            else:
                uri = MEMORY
                self.images[item_id] = data
            sources.append({"source_uri": uri, "source_row": -1})
        return [{**(m or {}), **s} for m, s in zip(metadata or [{}] * len(ids), sources, strict=True)]

    async def _upsert(self, ids, vectors, metadata, fingerprint) -> dict:
        index = self.current
        if not same_model(index.fingerprint, fingerprint):
            raise VersionMismatch(f"items embedded by {fingerprint}, index built from {index.fingerprint}")
        replaced = [i for i in ids if has(index, i)]
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
        if replaced:
            self._logged("remove", replaced)
        self._logged("add", ids, vectors, metadata)
        count = len(index)
        await self._save(index)
        return {"replaced": len(replaced), "count": count}

    async def remove(self, ids: list[str]) -> dict:
        async with self.changing:
            index = self.current
            held = [i for i in ids if has(index, i)]
            if held:
                index.remove(held)
                self._logged("remove", held)
                for item_id in held:
                    self.images.pop(item_id, None)
                await self._save(index)
            return {"removed": len(held), "count": len(index)}

    async def _save(self, index) -> None:
        if self.persist:
            await asyncio.to_thread(index.save)
