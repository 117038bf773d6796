"""Auto-tuning of an index's search parameters against exact search.

    python -c "from system.index import open_index; print(open_index('runs/idx').info()['operating_points'])"

The build measures, on held-out queries, recall@10 and queries per second for a grid of
search parameters (nprobe for IVF, efSearch for HNSW, k_factor for a refine stage), keeps
the Pareto-optimal operating points in the manifest, and `pick_point` returns the cheapest
one (highest QPS) that meets a target recall.

FAISS's ParameterSpace does the same sweep but cannot reach through IndexIDMap2 to a
refine stage's k_factor, and counts recall by ids only; so the walk over wrappers
(`search_knobs`, `set_search_params`) is written here.
"""

from __future__ import annotations

import time

import faiss
import numpy as np

TUNE_K = 10
TUNE_QUERIES = 300


def _walk(index: faiss.Index):
    """Every index in the wrapper chain (id maps, pre-transforms, refine stages, shards)."""
    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexShards):
        for i in range(index.count()):
            yield from _walk(index.at(i))
    elif isinstance(index, faiss.IndexRefine):
        yield from _walk(index.base_index)
    elif isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        yield from _walk(index.index)


def search_knobs(index: faiss.Index) -> dict[str, list[int]]:
    """The search parameters this index has, each with the values the sweep tries."""
    knobs: dict[str, list[int]] = {}
    for part in _walk(index):
        if isinstance(part, faiss.IndexIVF):
            # Steps of about x1.4: doubling overshoots the target recall, and the cost grows with it.
            steps = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
            knobs["nprobe"] = [p for p in steps if p <= part.nlist]
        elif isinstance(part, faiss.IndexHNSW):
            knobs["efSearch"] = [10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512]
        elif isinstance(part, faiss.IndexRefine):
            knobs["k_factor"] = [1, 2, 3, 4, 6, 8, 12, 16, 32]
    return knobs


# FAISS's fast-scan IVF has several scan kernels (`implem`; 0 lets it pick). Kernel 11 gives
# the same results; at batch size 1 it took 20,000 CIFAR-10 vectors from 20,655 to 23,879
# queries/s (256-d) and from 12,975 to 18,081 (1024-d) (benchmarks/bench_index.py rows of
# 2026-12-06); in batches of 500 it measured -10% to +10% in exploration runs.
FASTSCAN_IMPLEM = 11


def set_search_params(index: faiss.Index, params: dict) -> None:
    for part in _walk(index):
        if isinstance(part, faiss.IndexIVFFastScan):
            part.implem = FASTSCAN_IMPLEM
        if isinstance(part, faiss.IndexIVF) and "nprobe" in params:
            part.nprobe = int(params["nprobe"])
            quantizer = faiss.downcast_index(part.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):  # IVF..._HNSW: the graph must reach nprobe lists
                quantizer.hnsw.efSearch = max(64, 2 * part.nprobe)
        elif isinstance(part, faiss.IndexHNSW) and "efSearch" in params:
            part.hnsw.efSearch = int(params["efSearch"])
        elif isinstance(part, faiss.IndexRefine) and "k_factor" in params:
            part.k_factor = float(params["k_factor"])


def held_out_queries(sample: np.ndarray, n: int, normalized: bool, seed: int = 1) -> np.ndarray:
    """Queries near the data but not stored vectors: 0.7/0.3 mixes of two sampled vectors.

    A stored vector would find itself first, which flatters recall for free.
    """
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(sample), (2, min(n, len(sample))))
    queries = 0.7 * sample[a] + 0.3 * sample[b]
    if normalized:
        queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(queries, dtype=np.float32)


def exact_heap(queries: np.ndarray, metric: str, k: int = TUNE_K) -> faiss.ResultHeap:
    """A running exact top-k: feed it every (labels, vectors) batch with `exact_update`."""
    return faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")


def exact_update(heap: faiss.ResultHeap, queries: np.ndarray, vectors, labels, metric: str) -> None:
    k = min(heap.k, len(vectors))
    if k == 0 or len(queries) == 0:
        return
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    scores, rows = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), k, metric=faiss_metric)
    if k < heap.k:  # pad so every batch has the heap's width
        pad = heap.k - k
        fill = -np.inf if metric == "ip" else np.inf
        scores = np.hstack([scores, np.full((len(queries), pad), fill, np.float32)])
        rows = np.hstack([rows, np.full((len(queries), pad), -1)])
    heap.add_result(scores, np.where(rows >= 0, np.asarray(labels)[np.maximum(rows, 0)], -1))


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k labels found in the first k results (FAISS's intersection measure)."""
    hits = sum(len(np.intersect1d(f[:k][f[:k] >= 0], t[:k][t[:k] >= 0])) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def sweep(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, budget_s: float = 120.0) -> list[dict]:
    """Pareto-optimal operating points {"params", "recall@10", "qps"}, cheapest first.

    The inner parameter (nprobe or efSearch) grows until recall stops improving, so the
    sweep never pays for the slowest settings of an index that is already exact there.
    """
    knobs = search_knobs(index)
    outer = knobs.pop("k_factor", [None])
    inner_name, inner = next(iter(knobs.items()), (None, [None]))
    points, deadline, best = [], time.perf_counter() + budget_s, -1.0
    for k_factor in outer:
        for value in inner:
            params = {inner_name: value} if inner_name else {}
            if k_factor is not None:
                params["k_factor"] = k_factor
            set_search_params(index, params)
            index.search(queries[:8], TUNE_K)  # warm-up
            seconds = []
            for _ in range(3):  # best of 3: the machine is shared, and noise would reorder points
                start = time.perf_counter()
                _, found = index.search(queries, TUNE_K)
                seconds.append(time.perf_counter() - start)
            qps = len(queries) / max(min(seconds), 1e-9)
            recall = recall_at(found, truth, TUNE_K)
            points.append({"params": params, "recall@10": round(recall, 4), "qps": round(qps, 1)})
            saturated = (
                len(points) > 1
                and points[-2]["params"].get("k_factor") == k_factor
                and (recall <= points[-2]["recall@10"] + 0.001)
            )  # a larger nprobe / efSearch gained nothing: this refine factor is the limit
            if recall >= 0.999 or saturated or time.perf_counter() > deadline:
                break
        row_best = max(p["recall@10"] for p in points if p["params"].get("k_factor") == k_factor)
        if time.perf_counter() > deadline or row_best >= 0.999 or row_best <= best + 0.001:
            break  # a larger refine factor would only cost more
        best = row_best
    frontier = [
        p
        for p in points
        if not any(q["recall@10"] >= p["recall@10"] and q["qps"] > p["qps"] for q in points if q is not p)
    ]
    return sorted(frontier, key=lambda p: -p["qps"])


def pick_point(points: list[dict], target_recall: float) -> dict | None:
    """The fastest point meeting the target, else the most accurate one."""
    if not points:
        return None
    good = [p for p in points if p["recall@10"] >= target_recall]
    return max(good, key=lambda p: p["qps"]) if good else max(points, key=lambda p: p["recall@10"])
