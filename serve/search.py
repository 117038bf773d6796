"""Searching one VectorIndex the way every serve path does: the retriever deployment, and the
ingress when it holds the index itself (serve.local_index).

Matryoshka prefixes, hit rows with their metadata (less the columns that say where an item's
image is stored: internal paths stay on the server), the exact top-k merge over shards.

    .venv/bin/python -m pytest -q tests/test_serve.py -k "search"
"""

from __future__ import annotations

import numpy as np

from serve.errors import PrefixDimError

# Passthrough columns that locate an item's image (system.embed.batch writes them): used by
# GET /v1/items/{id}/image, never shown in hits.
SOURCE_COLUMNS = ("source_uri", "source_row")


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


def run_search(index, vectors: np.ndarray, k: int, filter: dict | None = None):
    """index.search, with the metadata filter when one is given: (ids per query, scores)."""
    if filter is None:
        return index.search(vectors, k)
    return index.search(vectors, k, filter=filter)


def hits(index, ids: list[list[str]], scores: np.ndarray) -> list[list[dict]]:
    """Hit rows {"id", "score", "metadata"}; a row holds fewer than k when the index is small."""
    flat_ids = [i for row in ids for i in row]
    metadata = iter(public(index.metadata(flat_ids)) if flat_ids else [])
    return [
        [
            {"id": i, "score": float(s), "metadata": next(metadata)}
            for i, s in zip(row_ids, row_scores, strict=False)
        ]
        for row_ids, row_scores in zip(ids, scores, strict=True)
    ]


def public(metadata: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in SOURCE_COLUMNS} for m in metadata]


def filterable_columns(index) -> list[str]:
    """Metadata columns a client can filter on (what the search page offers)."""
    from system.index.filters import filterable_columns as attributes

    return [name for name in attributes(index.idmap.schema) if name not in SOURCE_COLUMNS]


def has(index, item_id: str) -> bool:
    from system.index import IndexInputError

    try:
        index.metadata([item_id])
    except IndexInputError:
        return False
    return True


def merge_hits(per_shard: list[list[list[dict]]], k: int, metric: str) -> list[list[dict]]:
    """Exact top-k over shards: each shard's top-k holds every hit of the global top-k it owns."""
    if len(per_shard) == 1:
        return per_shard[0]
    best_first = metric != "l2"  # inner product: higher is better; L2 distance: lower
    return [
        sorted((h for rows in query for h in rows), key=lambda h: h["score"], reverse=best_first)[:k]
        for query in zip(*per_shard, strict=True)
    ]
