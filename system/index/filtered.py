"""Filtered search: nearest neighbours among the rows a metadata filter matches.

    from system.index import open_index
    ids, scores = open_index("runs/idx").search(queries, 10, filter={"label": 3})

Three strategies, chosen per call by the filter's selectivity (the share of rows it
matches), as the FAISS big-ann filtered baseline and Qdrant do:

- exact: the matching rows' stored vectors (as the index decodes them) are scored with
  faiss.knn. Cost grows with the number of matches, so it wins for selective filters.
- ann: each shard is searched with a FAISS IDSelectorBitmap over its ids and search
  parameters (efSearch, nprobe) widened so that recall holds: the k nearest matching
  rows lie further out than the k nearest rows.
- post: the unfiltered search for k x factor hits, the non-matching ones dropped; queries
  left with fewer than k matches (a filter that runs against the vectors) are searched
  again with the selector, and the tuning times both. For a broad filter it is the
  cheapest: most hits match, and the index's fast path (fast-scan IVF's SIMD kernels) runs
  without a selector. On 8,000 CIFAR-10 embeddings at 50% selectivity the selector search
  reached recall@10 0.95 at 3,539 queries/s, the post-filter at 48,195
  (benchmarks/bench_index_filter.py, 2026-12-06).

The build measures all three on random subsets of 50%, 10%, 1% and 0.1% of the rows
(`tune_filtered`) and records in the manifest, per selectivity, the widened parameters and
post-filter factor reaching the target recall and the fastest strategy ("filter_points");
a search uses the point of the nearest tuned selectivity at or below its own (never less
widened than it needs). Untuned indexes widen by 1/selectivity and go exact below 1%.

Selectors reach through FAISS's wrappers by hand: IndexIDMap2 translates a selector only
for indexes that read `params.sel` themselves, and IndexRefine passes its base index only
`base_index_params`. So each shard's inner index is searched with a bitmap over its own
internal ids and the labels are translated here. Filtering runs on CPU: FAISS's GPU
indexes filter only through cuVS, which this FAISS build may not have (`filter_device`).
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from system.index.tune import TUNE_K, recall_at, search_knobs

SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)
EXACT_ROWS = 2048  # this few matches: exact is always cheaper than a widened graph or list scan
MAX_EF = 4096


def filter_device() -> str:
    """Where filtered search runs, for `index info`."""
    if "CUVS" in faiss.get_compile_options().upper() and faiss.get_num_gpus() > 0:
        return "cpu (GPU filtering through cuVS exists in this FAISS build but is not wired here)"
    return "cpu (this FAISS build has no cuVS, so GPU indexes cannot filter)"


def widen(index: faiss.Index, params: dict, factor: float) -> dict:
    """`params` with efSearch / nprobe multiplied by `factor` (capped at what the index has)."""
    knobs, out = search_knobs(index), dict(params)
    if "nprobe" in knobs:
        top = max(knobs["nprobe"])
        out["nprobe"] = int(min(top, np.ceil(params.get("nprobe", 1) * factor)))
    if "efSearch" in knobs:
        out["efSearch"] = int(min(MAX_EF, max(TUNE_K, np.ceil(params.get("efSearch", 16) * factor))))
    return out


def _search_params(index: faiss.Index, params: dict, sel, keep: list) -> faiss.SearchParameters:
    """FAISS search parameters for the chain under `index`, with `sel` at the searching level."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        p = faiss.IndexRefineSearchParameters()
        p.k_factor = float(params.get("k_factor", index.k_factor))
        p.base_index_params = _search_params(index.base_index, params, sel, keep)
    elif isinstance(index, faiss.IndexPreTransform):
        p = faiss.SearchParametersPreTransform()
        p.index_params = _search_params(index.index, params, sel, keep)
    elif isinstance(index, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(params.get("efSearch", index.hnsw.efSearch))
        p.sel = sel
    elif isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = int(params.get("nprobe", index.nprobe))
        p.sel = sel
    else:
        p = faiss.SearchParameters()
        p.sel = sel
    keep.append(p)  # FAISS holds raw pointers: the Python objects must outlive the search
    return p


def _bitmap(mask: np.ndarray, keep: list) -> faiss.IDSelectorBitmap:
    bits = np.packbits(mask, bitorder="little")
    keep.append(bits)
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))


def _shard_search(shard, queries, k, allowed: np.ndarray, params: dict):
    """Search one shard among the labels set in `allowed` (bool over labels): (scores, labels)."""
    keep: list = []
    shard = faiss.downcast_index(shard)
    if isinstance(shard, faiss.IndexIDMap):  # IndexIDMap2 too: a bitmap over internal ids
        id_map = faiss.vector_to_array(shard.id_map)
        inside = np.zeros(len(id_map), bool)
        known = id_map < len(allowed)
        inside[known] = allowed[id_map[known]]
        inner, translate = shard.index, id_map
    else:  # IVF stores the labels in its lists
        inner, inside, translate = shard, allowed, None
    if not inside.any():
        return None
    sel = _bitmap(inside, keep)
    scores, found = inner.search(queries, k, params=_search_params(inner, params, sel, keep))
    if translate is not None:
        found = np.where(found >= 0, translate[np.maximum(found, 0)], -1)
    return scores, found


def merge(results: list, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of per-shard (scores, labels), padded with label -1."""
    scores = np.hstack([r[0] for r in results])
    labels = np.hstack([r[1] for r in results])
    key = np.where(labels >= 0, -scores if metric == "ip" else scores, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)


def ann_search(shards, queries, k, allowed: np.ndarray, params: dict, metric: str):
    """Selector search in every shard, merged: (scores, labels) [n, k], labels -1 past the hits."""
    results = [r for s in shards if (r := _shard_search(s, queries, k, allowed, params)) is not None]
    if not results:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return merge(results, k, metric)


def post_search(index: faiss.Index, shards, queries, k, allowed: np.ndarray, params: dict, metric: str):
    """Unfiltered top k x post_factor, the labels outside `allowed` dropped: (scores, labels) [n, k].

    A filter that runs against the vectors (a label far from the query) leaves some queries
    short of k matches: those are searched again with the selector (`ann_search`). Where
    the post-filter found k, they are the filtered top k of what the index ranks.
    """
    factor = params["post_factor"]
    scores, labels = index.search(queries, int(min(index.ntotal, k * factor)))
    known = (labels >= 0) & (labels < len(allowed))
    ok = known & allowed[np.where(known, labels, 0)]
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # matching hits first, in score order
    keep = np.take_along_axis(ok, order, 1)
    fill = -np.inf if metric == "ip" else np.inf
    scores = np.where(keep, np.take_along_axis(scores, order, 1), fill).astype(np.float32)
    labels = np.where(keep, np.take_along_axis(labels, order, 1), -1)
    short = keep.sum(axis=1) < min(k, int(allowed.sum()))
    if short.any():
        scores[short], labels[short] = ann_search(shards, queries[short], k, allowed, params, metric)
    return scores, labels


def exact_search(shards, queries, k, labels: np.ndarray, shard_of: np.ndarray, metric: str):
    """Brute force over the stored vectors of `labels` (shard_of: their shard): (scores, labels)."""
    vectors = np.zeros((len(labels), queries.shape[1]), np.float32)
    for s, shard in enumerate(shards):
        if (mine := shard_of == s).any():
            vectors[mine] = shard.reconstruct_batch(labels[mine])
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    scores, rows = faiss.knn(queries, vectors, min(k, len(labels)), metric=faiss_metric)
    return scores, np.where(rows >= 0, labels[np.maximum(rows, 0)], -1)


def plan(manifest: dict, index: faiss.Index, selectivity: float, matching: int) -> tuple[str, dict]:
    """(strategy, ANN search params) for a filter matching `matching` rows, a share `selectivity`.

    The params are those the ANN strategy would use, whichever strategy is chosen, plus
    "post_factor" for the post-filter.
    """
    base = manifest.get("search_params") or {}
    points = manifest.get("filter_points") or []
    below = [p for p in points if p["selectivity"] <= selectivity * 1.0001]
    if below:
        point = max(below, key=lambda p: p["selectivity"])
    else:
        point = min(points, key=lambda p: p["selectivity"]) if points else None
    params = (point or {}).get("ann_params") or widen(index, base, 1 / max(selectivity, 1e-6))
    params = {**params, "post_factor": (point or {}).get("post_factor", 0)}
    if matching <= EXACT_ROWS:
        return "exact", params
    if point is not None:
        return point["strategy"], params
    return ("exact" if selectivity < 0.01 else "ann"), params


def _timed(search, reps: int = 3):
    search()  # warm-up
    best, out = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        out = search()
        best = min(best, time.perf_counter() - start)
    return out, best


def _ann_point(vindex, queries, allowed, truth, target: float, deadline: float) -> dict:
    """The least widened search params reaching `target` (else the widest tried), timed."""
    base = vindex.manifest.get("search_params") or {}
    factor, last, point = 1.0, None, {}
    while time.perf_counter() < deadline or not point:
        params = widen(vindex.index, base, factor)
        if params == last and factor > 1:
            break  # nothing left to widen
        last = params

        def search(p=params):
            return ann_search(vindex.shards, queries, TUNE_K, allowed, p, vindex.metric)

        (_, found), seconds = _timed(search, 1)
        recall = recall_at(found, truth, TUNE_K)
        point = {"ann_params": params, "ann_recall": round(recall, 4), "ann_s": seconds}
        if recall >= target:
            point["ann_s"] = _timed(search, 3)[1]
            break
        factor *= 2
    return point


def _post_point(vindex, queries, allowed, truth, ann_params, target: float, deadline: float) -> dict:
    """The smallest post-filter factor reaching `target`, timed with its selector searches of
    the queries it leaves short ({} when none does in time)."""
    factor = 2
    while time.perf_counter() < deadline or factor == 2:  # past the deadline: one measurement

        def search(f=factor):
            params = {**ann_params, "post_factor": f}
            return post_search(vindex.index, vindex.shards, queries, TUNE_K, allowed, params, vindex.metric)

        (_, found), seconds = _timed(search, 1)
        if recall_at(found, truth, TUNE_K) >= target:
            return {"post_factor": factor, "post_s": _timed(search, 3)[1]}
        if TUNE_K * factor >= len(vindex):
            break  # already the whole index
        factor *= 2
    return {}


def tune_filtered(vindex, queries: np.ndarray, target: float, budget_s: float = 60.0, seed: int = 0) -> list:
    """Filtered operating points of a VectorIndex on random subsets of its rows (see module doc).

    Ground truth is the exact search over the subset's stored (decoded) vectors, the same
    answer the exact strategy gives; each point keeps the faster strategy at `target`.
    """
    n, rng, points = len(vindex), np.random.default_rng(seed), []
    deadline = time.perf_counter() + budget_s
    for selectivity in SELECTIVITIES:
        matching = int(round(selectivity * n))
        if matching < 2 * TUNE_K:  # past the deadline each share still gets one measurement
            continue
        rows = np.sort(rng.choice(n, matching, replace=False))
        labels, shard_of = vindex._labels[rows], vindex._shard[rows]
        allowed = np.zeros(int(vindex._labels.max()) + 1, bool)
        allowed[labels] = True
        (_, truth), exact_s = _timed(
            lambda a=labels, b=shard_of: exact_search(vindex.shards, queries, TUNE_K, a, b, vindex.metric)
        )
        ann = _ann_point(vindex, queries, allowed, truth, target, deadline)
        ann_s = ann.pop("ann_s")
        post = _post_point(vindex, queries, allowed, truth, ann["ann_params"], target, deadline)
        post_s = post.pop("post_s", None)
        seconds = {"exact": exact_s}  # the strategies reaching the target, timed
        if ann["ann_recall"] >= target:
            seconds["ann"] = ann_s
        if post_s is not None:
            seconds["post"] = post_s
        point = {"selectivity": selectivity, "strategy": min(seconds, key=seconds.get)}
        point.update(ann)
        point.update(post)
        point.update({f"{name}_qps": round(len(queries) / s, 1) for name, s in seconds.items()})
        points.append(point)
    return points
