"""Evaluate an index: recall against exact search (optionally under a metadata filter), QPS, latency, size.

    repforge index eval --index runs/index
    repforge index eval --index runs/index --filter '{"label": 3}'

Moved out of api.py (VectorIndex), which it uses only through its public face and id map.
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

from system import storage
from system.index.api import VectorIndex, check_k, open_index
from system.index.files import INDEX_FILE
from system.index.filters import filter_mask
from system.index.recipes import IndexInputError, as_matrix


def _recall(index: VectorIndex, stored: np.ndarray, queries, found: list[list[str]], exact, k: int) -> float:
    """Mean fraction of the k found ids whose exact score ties or beats the k-th exact score.

    Scoring by value rather than by id makes ties among equally close vectors free: any of
    them is a correct answer, whichever one FAISS happens to return.
    """
    hits = 0
    for query, ids, best in zip(queries, found, exact, strict=True):
        vectors = stored[index._rows(ids[:k])]
        kth = best[k - 1]
        slack = 1e-4 * max(1.0, abs(float(kth)))  # BLAS vs numpy rounding
        if index.metric == "ip":
            hits += int((vectors @ query >= kth - slack).sum())
        else:
            hits += int((((vectors - query) ** 2).sum(axis=1) <= kth + slack).sum())
    return hits / (k * len(queries))


def _search_times(index: VectorIndex, queries, batch: int, k: int, reps: int, budget_s: float, filter=None):
    # Cycle through the queries so repetitions do not just re-read one cached batch.
    batches = [queries[(np.arange(batch) + i * batch) % len(queries)] for i in range(reps)]
    index.search(batches[0], k, filter)  # warm-up: first-call allocations are not search speed
    times, deadline = [], time.perf_counter() + budget_s
    for q in batches:
        if times and time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        index.search(q, k, filter)
        times.append(time.perf_counter() - start)
    return np.array(times)


def evaluate_index(
    index_uri: str,
    queries: np.ndarray | None = None,
    k: int = 10,
    num_queries: int = 200,
    target_recall: float | None = None,
    filter=None,
) -> dict:
    """Recall@1/10/100/k against exact search, queries per second, latency and size of an index.

    The ground truth is an exact FAISS Flat index over the stored vectors as the index
    reconstructs them, so for lossy codes (PQ, SQ) recall measures the search, not the
    quantisation. Queries default to `num_queries` stored vectors sampled with a fixed seed.
    With `filter`, the ground truth is the exact search over the rows the filter matches,
    and every search (the timed ones too) is filtered.
    """
    if num_queries < 1:
        raise IndexInputError(f"num_queries must be at least 1, got {num_queries}")
    index = open_index(index_uri, target_recall)
    n, k = len(index), check_k(k)
    if n == 0:
        raise IndexInputError("cannot evaluate an empty index")
    stored = index.reconstruct(index._ids.tolist())
    if queries is None:
        queries = stored[np.sort(np.random.default_rng(0).choice(n, min(num_queries, n), replace=False))]
    queries = as_matrix(queries, index.dim)
    mask = filter_mask(filter, index.idmap)
    matching = int(mask.sum())
    if matching == 0:
        raise IndexInputError("the filter matches no rows: nothing to evaluate")
    exact = faiss.IndexFlatIP(index.dim) if index.metric == "ip" else faiss.IndexFlatL2(index.dim)
    exact.add(stored[mask])
    report = {
        "uri": storage.normalize(index_uri),
        "factory": index.manifest["factory"],
        "metric": index.metric,
    }
    report.update(count=n, dim=index.dim, num_queries=len(queries))
    if filter is not None:
        report.update(filter=filter, matching=matching, selectivity=round(matching / n, 6))
    for at in sorted({kk for kk in (1, 10, 100, k) if kk <= matching}):
        exact_scores, _ = exact.search(queries, at)
        found, _ = index.search(queries, at, filter)  # one search per k: HNSW/IVF results depend on k
        report[f"recall@{at}"] = round(_recall(index, stored, queries, found, exact_scores, at), 4)
    single = _search_times(index, queries, 1, k, reps=len(queries), budget_s=2.0, filter=filter)
    batched = _search_times(index, queries, 256, k, reps=5, budget_s=2.0, filter=filter)
    files = list(index.manifest.get("files", [INDEX_FILE]))
    files += [str(Path(f).with_suffix(".ivfdata")) for f in files] if index.manifest.get("on_disk") else []
    size = 0
    for name in files:
        fs, path = storage.filesystem(storage.join(report["uri"], name))
        size += fs.get_file_info(path).size
    report.update(
        qps_batch1=round(1.0 / float(np.median(single)), 1),
        qps_batch256=round(256 / float(np.median(batched)), 1),
        latency_ms_p50=round(1000 * float(np.percentile(single, 50)), 4),
        latency_ms_p99=round(1000 * float(np.percentile(single, 99)), 4),
        latency_ms_p50_batch256=round(1000 * float(np.percentile(batched, 50)), 4),
        latency_ms_p99_batch256=round(1000 * float(np.percentile(batched, 99)), 4),
        bytes_per_vector=round(size / n, 1),
        build_seconds=index.manifest.get("build_seconds"),
        shards=len(index.shards),
        search_params=index.manifest.get("search_params", {}),
        device="gpu" if index._gpu is not None else "cpu",
    )
    return report
