"""`--factory auto`: the recipe with the most queries/s at the target recall, by measurement.

    repforge index build --embeddings runs/emb --out runs/index --target-recall 0.95 --tune-seconds 120

The vector count alone does not say which index is fastest at a recall: that depends on
the data (dimension, clustering, intrinsic dimension) and the machine. So every candidate
whose memory estimate for the full set fits the budget is built on a sample of the data
(at most SAMPLE_ROWS rows), its search parameters are swept on held-out rows of the data
(never indexed) against their exact top-10 (system/index/tune.py), and the candidate with
the most queries/s at the target recall wins. Exact search (Flat) is measured like the
others, its queries/s scaled from the sample to the full count (its cost is linear in
it), and wins only when nothing else is faster at the target; a tiny set (TINY_COUNT
rows or fewer) is searched exactly without measuring. The manifest's "auto" section keeps
every candidate's operating points and the reason for the winner.

Candidates (FAISS 1.15): IVF with 4-bit fast-scan PQ (of the vectors or of their residuals)
and an 8-bit re-rank, HNSW over 8-bit scalar codes, IVF over 8-bit codes, IVF-RaBitQ with an 8-bit
re-rank, exact. OPQ is left out: its training takes minutes on a few CPUs and the re-rank
recovers what it would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import faiss
import numpy as np

from system.index.recipes import ID_BYTES, METRICS, IndexInputError, gib, new_index, nlist_for
from system.index.tune import TUNE_K, pick_point, sweep

SAMPLE_ROWS = 50_000  # candidates are built on this many rows at most
QUERY_ROWS = 200  # held-out rows used as queries
TINY_COUNT = 2_000  # at or below: exact search (a query scans this many vectors in microseconds)
DEFAULT_TUNE_SECONDS = 120.0

# Measured in registration order, so under a tight --tune-seconds the usual winners go first.
CANDIDATES: dict[str, Callable[[int, int], tuple[str, float]]] = {}


def candidate(name: str):
    def register(make):
        if name in CANDIDATES:
            raise ValueError(f"auto candidate {name!r} registered twice")
        CANDIDATES[name] = make
        return make

    return register


def _even_divisor(dim: int, at_most: int) -> int:
    """The largest even divisor of dim up to at_most (fast-scan PQ packs codes in pairs)."""
    for m in range(min(at_most, dim), 1, -1):
        if dim % m == 0 and m % 2 == 0:
            return m
    return 2 if dim % 2 == 0 else 1


@candidate("exact")
def exact(count: int, dim: int):
    return "Flat", 4 * dim + ID_BYTES


def nlist_fastscan(count: int) -> int:
    """Lists for a fast-scan IVF: about sqrt(n), a quarter of nlist_for's.

    Scanning 4-bit codes in SIMD registers is cheap and each probed list has a fixed cost, so
    fewer, longer lists win: on 20,000 CIFAR-10 embeddings (256-d), in one exploration run,
    IVF256 reached recall@10 0.95 at 1.27x the queries/s of IVF512, and IVF128 faster still.
    """
    nlist = 2 ** round(math.log2(max(16.0, math.sqrt(max(count, 1)))))
    return int(max(16, min(nlist, 2 ** int(math.log2(max(count // 39, 16))))))


def _pqfs(count: int, dim: int, dims_per_code: int, residual: str):
    m = _even_divisor(dim, max(2, dim // dims_per_code))
    return f"IVF{nlist_fastscan(count)},PQ{m}x4fs{residual},Refine(SQ8)", m / 2 + dim + 3 * ID_BYTES


# Two fast-scan variants, each the winner on one kind of data (benchmarks/bench_index.py rows,
# 20,000 CIFAR-10 vectors): codes of the residual to the list's centroid, 2 dims per 4-bit
# code, for 256-d embeddings; codes of the vectors, 4 dims per code, for 1024-d pixels. In
# exploration runs on the same data the other layout did worse on each: x1.34 hnswlib's
# queries/s instead of x1.74 on the embeddings, x0.40 instead of x2.40 on the pixels (there
# the residual costs a lookup table per probed list).
@candidate("ivf_pqfs_refine")
def ivf_pqfs_refine(count: int, dim: int):
    return _pqfs(count, dim, 4, "")


@candidate("ivf_pqfsr_refine")
def ivf_pqfsr_refine(count: int, dim: int):
    return _pqfs(count, dim, 2, "r")


@candidate("hnsw_sq8")
def hnsw_sq8(count: int, dim: int):
    # 32 links at level 0 (int32) plus the upper levels, 8-bit codes, the id map.
    return "HNSW32,SQ8", dim + 4 * 2 * 32 * 1.05 + 2 * ID_BYTES


@candidate("ivf_sq8")
def ivf_sq8(count: int, dim: int):
    return f"IVF{nlist_for(count)},SQ8", dim + ID_BYTES


@candidate("ivf_rabitq_refine")
def ivf_rabitq_refine(count: int, dim: int):
    return f"IVF{nlist_for(count)},RaBitQ,Refine(SQ8)", dim / 8 + 8 + dim + 3 * ID_BYTES


def estimate(name: str, count: int, dim: int) -> tuple[str, int]:
    """(factory string, estimated RAM bytes) of candidate `name` for `count` vectors."""
    factory, per_vector = CANDIDATES[name](count, dim)
    centroids = 4 * dim * nlist_for(count) if "IVF" in factory else 0
    return factory, int(per_vector * count + centroids)


def split_sample(sample: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows to index, held-out rows to query with): the queries are real rows, never indexed."""
    held = min(QUERY_ROWS, max(1, len(sample) // 10))
    order = np.random.default_rng(seed).permutation(len(sample))
    return np.ascontiguousarray(sample[order[held:]]), np.ascontiguousarray(sample[order[:held]])


def _measure(name: str, base, queries, truth, metric: str, count: int, budget_s: float) -> dict:
    dim = base.shape[1]
    factory, _ = CANDIDATES[name](len(base), dim)
    start = time.perf_counter()
    index = new_index(dim, factory, metric)
    index.train(base)
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    built = time.perf_counter() - start
    points = sweep(index, queries, truth, budget_s=budget_s)
    if name == "exact":  # a scan: its cost grows linearly with the count
        points = [{**p, "qps": round(p["qps"] * len(base) / count, 1)} for p in points]
    bytes_per_vector = len(faiss.serialize_index(index)) / len(base)
    return {
        "name": name,
        "factory": factory,
        "build_seconds_on_sample": round(built, 2),
        "bytes_per_vector_on_sample": round(bytes_per_vector, 1),
        "operating_points": points,
    }


def select_factory(
    sample: np.ndarray,
    count: int,
    metric: str,
    budget: int,
    target_recall: float = 0.95,
    tune_seconds: float = DEFAULT_TUNE_SECONDS,
    tiny_count: int = TINY_COUNT,
) -> tuple[str, str, int, dict]:
    """(factory for `count` vectors, one-line reason, estimated RAM, record for the manifest).

    `sample`: rows drawn uniformly from the data (queries are held out of it).
    """
    dim = sample.shape[1]
    fits = {}
    for name in CANDIDATES:
        factory, ram = estimate(name, count, dim)
        if ram <= budget:
            fits[name] = (factory, ram)
    if not fits:
        sizes = ", ".join(f"{n} ~{gib(estimate(n, count, dim)[1])}" for n in CANDIDATES)
        raise IndexInputError(
            f"no index recipe fits {count} vectors of dim {dim} in {gib(budget)} per shard ({sizes}): "
            "raise --memory-budget, add --shards or use --on-disk"
        )
    if count <= tiny_count and "exact" in fits:
        factory, ram = fits["exact"]
        reason = f"auto: {count} vectors is tiny: exact search (Flat), ~{gib(ram)} RAM"
        return factory, reason, ram, {"candidates": [], "winner": "exact", "why": reason}
    base, queries = split_sample(sample)
    faiss_metric = METRICS[metric]
    truth = faiss.knn(queries, base, min(TUNE_K, len(base)), metric=faiss_metric)[1]
    deadline = time.perf_counter() + tune_seconds
    measured, skipped = [], []
    for n, name in enumerate(fits):
        left = deadline - time.perf_counter()
        if left <= 0 and measured:  # the first candidate is always measured
            skipped.append(name)
            continue
        try:
            budget_s = max(left, 0.1) / max(1, len(fits) - n)
            measured.append(_measure(name, base, queries, truth, metric, count, budget_s))
        except RuntimeError as e:  # a recipe FAISS cannot train on this sample (too few rows)
            skipped.append(f"{name} ({str(e).splitlines()[-1][:80]})")
    return _decide(measured, skipped, fits, count, len(base), len(queries), target_recall)


def _at_target(c: dict, target: float) -> dict | None:
    point = pick_point(c["operating_points"], target)
    return point if point and point["recall@10"] >= target else None


def _decide(measured, skipped, fits, count, base_rows, query_rows, target) -> tuple[str, str, int, dict]:
    if not measured:
        raise IndexInputError(
            f"auto: no candidate recipe could be built on the sample ({', '.join(skipped)})"
        )
    for c in measured:
        c["at_target"] = _at_target(c, target)
    good = [c for c in measured if c["at_target"]]
    if not good:  # nothing reaches the target: the most accurate candidate
        best = max(measured, key=lambda c: max(p["recall@10"] for p in c["operating_points"]))
        top = max(p["recall@10"] for p in best["operating_points"])
        why = f"no candidate reached recall@10 {target}: {best['name']} came closest ({top:.3f})"
    else:
        good.sort(key=lambda c: -c["at_target"]["qps"])
        best = good[0]
        qps = best["at_target"]["qps"]
        why = f"{best['name']} is the fastest at recall@10 >= {target}: {qps:.0f} queries/s"
        exact_c = next((c for c in good if c["name"] == "exact"), None)
        if exact_c is not None and best is not exact_c:
            why += f", x{qps / max(exact_c['at_target']['qps'], 1e-9):.2f} exact search"
        if len(good) > 1:
            runner = good[1]
            why += f"; next {runner['name']} {runner['at_target']['qps']:.0f} queries/s"
    factory, ram = fits[best["name"]]
    reason = (
        f"auto: measured {len(measured)} recipes on {base_rows} of {count} vectors with {query_rows} "
        f"held-out queries: {why} -> {factory}, ~{gib(ram)} RAM"
    )
    if skipped:
        reason += f"; not measured (time or training): {', '.join(skipped)}"
    record = {"candidates": measured, "winner": best["name"], "why": why, "skipped": skipped}
    record["sample_rows"], record["query_rows"] = base_rows, query_rows
    return factory, reason, ram, record


def auto_sample_rows(count: int) -> int:
    return min(count, SAMPLE_ROWS + QUERY_ROWS)
