"""The ingress's own copy of a one-shard index: searched in the replica that parsed the request.

A search through the retriever deployment pays a hop between replicas (5-15 ms on a 2-core
machine, benchmarks/RESULTS.md); an index that fits one replica is better searched where
the request already is. The retriever stays the one writer (live items, swaps, saving); each
ingress replica keeps a copy in step with it: a snapshot (the serialised FAISS index and id
map) when it starts or the retriever's index is swapped, then the changes since its version,
polled every POLL_S seconds and right after this replica changed the index itself. So a
replica reads its own writes at once and another replica's within POLL_S. Anything the copy
cannot answer (a query from another model during a swap, no copy yet) goes to the retriever.

    .venv/bin/python -m pytest -q tests/test_serve_live.py -k "items or swap"
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

log = logging.getLogger("ray.serve")
POLL_S = 0.25
INLINE_ROWS = 200_000  # searched on the event loop below this (microseconds); in a thread above


def from_snapshot(snap: dict):
    import faiss

    from system.index import VectorIndex

    shards = [faiss.deserialize_index(np.asarray(s)) for s in snap["shards"]]
    manifest = dict(snap["manifest"])
    return VectorIndex(shards, snap["idmap"], manifest, uri=None, shard_of_row=snap["shard_of_row"])


class LocalIndex:
    """A read copy of the index of one retriever deployment (a handle), kept in step with it."""

    def __init__(self, retriever):
        self.retriever = retriever
        self.index, self.epoch, self.version = None, "", 0
        self.lock = asyncio.Lock()  # a change is never applied while a search runs in a thread
        self.task: asyncio.Task | None = None
        self.disabled = False  # the retriever's index cannot travel (on-disk lists)

    def start(self) -> None:
        """Start polling (from a coroutine on the replica's event loop)."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while not self.disabled:
            try:
                await self.sync()
            except Exception as err:  # the retriever restarting: the next poll tries again
                log.warning("index copy: sync failed (%s); searching through the retriever", err)
            await asyncio.sleep(POLL_S)

    async def sync(self) -> None:
        reply = await self.retriever.changes_since.remote(self.epoch, self.version)
        if reply.get("reload"):
            snap = await self.retriever.snapshot.remote()
            if snap is None:
                self.disabled, self.index = True, None
                return
            index = await asyncio.to_thread(from_snapshot, snap)
            async with self.lock:
                self.index, self.epoch, self.version = index, snap["epoch"], snap["version"]
            return
        async with self.lock:
            for version, op, *args in reply["changes"]:
                if version <= self.version:
                    continue  # applied by a concurrent sync
                try:
                    if op == "add":
                        self.index.add(*args)
                    else:
                        self.index.remove(*args)
                except Exception as err:  # out of step: start over from a snapshot
                    log.warning("index copy: change %d failed (%s); reloading", version, err)
                    self.index, self.epoch = None, ""
                    return
                self.version = version

    def usable(self, fingerprint: str | None):
        """The copy when it may answer a query embedded by `fingerprint`, else None."""
        index = self.index
        if index is None or (fingerprint and index.fingerprint not in (None, fingerprint)):
            return None
        return index

    async def search(self, index, queries: np.ndarray, k: int):
        """(ids per query, scores) from the copy, `k` per query, one FAISS call."""
        if len(index) <= INLINE_ROWS:
            return index.search(queries, k)
        async with self.lock:
            return await asyncio.to_thread(index.search, queries, k)
