"""Index recipes: which FAISS index fits a vector count, dimension and memory budget, and how to make it.

    python -c "from system.index.recipes import choose_factory; print(choose_factory('auto', 10**9, 512))"

A recipe is a plain function `(count, dim) -> (factory string, RAM bytes per vector)`
registered with `@recipe(name, max_count)`, tried in registration order: the first whose
`max_count` admits the count and whose estimate fits the budget wins. Estimates count
the FAISS structures (codes, graph links, id maps, coarse centroids), not the id map of
string ids that `VectorIndex` keeps beside them.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
ID_BYTES = 16  # an int64 label in the codes plus its entry in the label -> row map


class IndexInputError(ValueError):
    """A user error about an index or its input: the message is one line."""


@dataclass(frozen=True)
class Recipe:
    name: str
    max_count: float
    make: Callable[[int, int], tuple[str, float]]
    on_disk: bool  # IVF recipes whose inverted lists can live on disk (no in-RAM refine stage)


RECIPES: dict[str, Recipe] = {}


def recipe(name: str, max_count: float = math.inf, on_disk: bool = False):
    def register(make):
        if name in RECIPES:
            raise ValueError(f"index recipe {name!r} registered twice")
        RECIPES[name] = Recipe(name, max_count, make, on_disk)
        return make

    return register


def nlist_for(count: int) -> int:
    # FAISS guideline: 4*sqrt(n)..16*sqrt(n) lists, with >= 39 training points per list.
    nlist = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(max(count, 1)))))
    return int(max(16, min(nlist, 262_144, 2 ** int(math.log2(max(count // 39, 16))))))


def pq_m(dim: int) -> int:
    """PQ sub-quantizers: about 4 dims each (8-bit codes), at most 64, dividing dim."""
    for m in range(min(64, max(1, dim // 4)), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _coarse(count: int) -> str:
    # Beyond ~1M lists' worth of data an exact coarse quantizer dominates search time.
    nlist = nlist_for(count)
    return f"IVF{nlist}_HNSW32" if nlist >= 65_536 else f"IVF{nlist}"


@recipe("flat", max_count=100_000)
def flat(count: int, dim: int):
    return "Flat", 4 * dim + ID_BYTES


@recipe("hnsw", max_count=5_000_000)
def hnsw(count: int, dim: int):
    # 32 links on level 0 plus ~1/32 of nodes on upper levels, int32 each.
    return "HNSW32", 4 * dim + 4 * 2 * 32 * 1.05 + ID_BYTES


@recipe("ivf_flat", max_count=50_000_000, on_disk=True)
def ivf_flat(count: int, dim: int):
    return f"{_coarse(count)},Flat", 4 * dim + ID_BYTES


@recipe("ivf_pq_refine")
def ivf_pq_refine(count: int, dim: int):
    # PQ codes find candidates, 8-bit scalar codes of the full vector re-rank them.
    # No OPQ rotation here: the re-rank recovers what it would, and OPQ training is slow.
    m = pq_m(dim)
    return f"{_coarse(count)},PQ{m},Refine(SQ8)", m + dim + 2 * ID_BYTES


@recipe("ivf_pq", on_disk=True)
def ivf_pq(count: int, dim: int):
    m = pq_m(dim)
    return f"OPQ{m},{_coarse(count)},PQ{m}", m + ID_BYTES


def default_budget() -> int:
    """Half the machine's RAM: the other half is for the OS, Ray and the id map."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def parse_bytes(text: str | int | None) -> int | None:
    """'4G', '512M', '1.5GiB' or a plain number of bytes."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise IndexInputError(f"memory budget {text!r}: use a size such as 512M, 4G or 1.5T")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def gib(n: float) -> str:
    """A byte count for people: 1.50 GiB, 12.0 MiB, 300 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size or unit == "KiB":
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def choose_factory(
    factory: str,
    count: int,
    dim: int,
    memory_budget: int | None = None,
    on_disk: bool = False,
) -> tuple[str, str, int]:
    """(FAISS factory string, reason, estimated RAM bytes) for `count` vectors of one shard.

    Any string other than "auto" is used as given. With `on_disk`, only IVF recipes without
    an in-RAM refine stage qualify, and their inverted lists do not count against the budget.
    """
    budget = memory_budget or default_budget()
    if factory != "auto":
        return factory, "given explicitly", 0
    skipped = []
    for r in RECIPES.values():
        if count > r.max_count or (on_disk and not r.on_disk):
            continue
        string, per_vector = r.make(count, dim)
        centroids = 4 * dim * nlist_for(count) if "IVF" in string else 0
        ram = (ID_BYTES if on_disk else per_vector) * count + centroids
        if ram <= budget:
            why = f"auto: {count} vectors of dim {dim} -> {r.name} ({string}), ~{gib(ram)} RAM"
            why += f" within budget {gib(budget)}"
            return string, why + (f"; too large: {', '.join(skipped)}" if skipped else ""), int(ram)
        skipped.append(f"{r.name} ~{gib(ram)}")
    raise IndexInputError(
        f"no index recipe fits {count} vectors of dim {dim} in {gib(budget)} per shard "
        f"({', '.join(skipped)}): raise --memory-budget, add --shards or use --on-disk"
    )


def shard_of(ids, num_shards: int) -> np.ndarray:
    """Shard of each string id: crc32 is stable across processes and Python versions (hash() is not)."""
    if num_shards == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return np.fromiter((zlib.crc32(str(i).encode()) for i in ids), np.int64, len(ids)) % num_shards


def faiss_reason(error: RuntimeError) -> str:
    # FAISS messages start with a C++ signature and a source location; keep what follows.
    return re.split(r"\.(?:cpp|h):\d+: ", str(error))[-1].strip().splitlines()[0]


def few(items) -> str:
    items = list(items)
    return ", ".join(map(repr, items[:5])) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def as_matrix(vectors, dim: int) -> np.ndarray:
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise IndexInputError(f"vectors must be numbers with shape [n, {dim}]") from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise IndexInputError(f"vectors must have shape [n, {dim}], got {list(array.shape)}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise IndexInputError(f"vectors contain NaN or inf (first at row {int(np.argmax(bad))})")
    return np.ascontiguousarray(array)


def unique_ids(ids) -> list[str]:
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise IndexInputError(f"duplicate ids: {few(i for i, n in Counter(ids).items() if n > 1)}")
    return ids


def new_index(
    dim: int, factory: str, metric: str, prefix_dim: int = 0, normalized: bool = False
) -> faiss.Index:
    """An empty FAISS index that stores our int64 labels, so add/remove never renumber rows.

    With `prefix_dim`, the factory's index is built on the first `prefix_dim` dimensions
    (re-normalised when the vectors are) and its candidates are re-ranked on the full
    vectors. FAISS's factory has no "take a prefix" step, so the chain is assembled here
    from FAISS parts: RemapDimensionsTransform -> NormalizationTransform -> index, inside
    IndexRefineFlat (whose refine stage holds the full vectors).
    """
    try:
        index = faiss.index_factory(prefix_dim or dim, factory, METRICS[metric])
    except RuntimeError as e:
        raise IndexInputError(f"FAISS rejects index factory {factory!r}: {faiss_reason(e)}") from None
    _no_polysemous(index)
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        # FAISS's default efConstruction (40) builds a graph that needs about twice the
        # efSearch for recall@10 0.95 on real embeddings; 100 is hnswlib-like quality.
        hnsw.hnsw.efConstruction = 100
    if prefix_dim:
        if isinstance(index, (faiss.IndexRefine, faiss.IndexIDMap)):
            message = f"--prefix-dim re-ranks on full vectors itself: drop Refine/IDMap from {factory!r}"
            raise IndexInputError(message)
        pre = faiss.IndexPreTransform(index)
        if normalized:
            pre.prepend_transform(faiss.NormalizationTransform(prefix_dim))
        pre.prepend_transform(faiss.RemapDimensionsTransform(dim, prefix_dim, False))
        # FAISS's Python wrappers keep the inner objects alive (referenced_objects).
        return faiss.IndexIDMap2(faiss.IndexRefineFlat(pre))
    if isinstance(index, faiss.IndexIDMap):  # the factory string asked for its own id map
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and not isinstance(index, faiss.IndexRefine):
        # IVF keeps labels in its inverted lists; IndexIDMap2's remove assumes the inner index
        # compacts (as Flat does), which IVF does not. A hashtable direct map gives
        # reconstruct and remove by label instead.
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index
    return faiss.IndexIDMap2(index)


def _no_polysemous(index: faiss.Index) -> None:
    # The factory turns on polysemous training for PQ: minutes of permutation search for a
    # Hamming filter that plain searches never use.
    while index is not None:
        index = faiss.downcast_index(index)
        if isinstance(index, (faiss.IndexIVFPQ, faiss.IndexPQ)):
            index.do_polysemous_training = False
        inner = getattr(index, "base_index", None) or getattr(index, "index", None)
        index = inner if isinstance(inner, faiss.Index) else None
