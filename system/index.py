"""FAISS index over an embeddings dataset: build, open, search, update, evaluate.

    repforge index build --embeddings runs/emb --out runs/index                # exact (Flat)
    repforge index build --embeddings runs/emb --out runs/index --factory IVF256,Flat
    repforge index eval --index runs/index

An index is a folder (the Index contract in DESIGN.md), always published whole with
`storage.publish_dir`, so a crash never leaves a half index:

    index.faiss     the FAISS index (a CPU index, even when searched on a GPU)
    ids.parquet     the id map: string `id`, int64 `faiss_id` (the label FAISS returns) and
                    the passthrough columns of the embeddings (label, ...)
    manifest.json   dim, metric, factory and why it was chosen, count, shards, model
                    fingerprint, normalized, classes, build seconds, faiss version, created

Scores: metric "ip" gives inner products (higher is better; cosine similarity for
L2-normalised vectors), metric "l2" gives squared L2 distances (lower is better).
Vectors are stored and searched as given, never re-normalised: queries must come from the
same model as the index (see `check_fingerprint`), which normalises them the same way.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from datetime import datetime, timezone

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from system import storage
from system.embed import read_embeddings

INDEX_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "ids.parquet", "manifest.json"
ADD_BATCH = 65_536  # bounds the temporary memory FAISS needs per add call
TRAIN_SAMPLE = 100_000  # k-means / PQ training gains little from more points
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


class IndexInputError(ValueError):
    """A user error about an index or its input: the message is one line."""


def _few(items) -> str:
    items = list(items)
    return ", ".join(map(repr, items[:5])) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _faiss_reason(error: RuntimeError) -> str:
    # FAISS messages start with a C++ signature and a source location; keep what follows.
    return re.split(r"\.(?:cpp|h):\d+: ", str(error))[-1].strip().splitlines()[0]


def _matrix(vectors, dim: int) -> np.ndarray:
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


def _unique_ids(ids) -> list[str]:
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise IndexInputError(f"duplicate ids: {_few(i for i, n in Counter(ids).items() if n > 1)}")
    return ids


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexInputError(f"k must be a positive integer, got {k!r}")
    return int(k)


def choose_factory(factory: str, count: int, dim: int) -> tuple[str, str]:
    """(FAISS factory string, reason for it). Any explicit string is used as is.

    "auto" is exact search (Flat) for now. TODO(scale): choose by size and memory: Flat up to
    ~1M vectors, HNSW32 while the vectors fit in RAM, IVF-PQ with Refine(Flat) beyond, with
    nprobe/efSearch tuned against exact search and recorded in the manifest.
    """
    if factory == "auto":
        return "Flat", f"auto: exact search for {count} vectors of dim {dim} (size-based choice: TODO)"
    return factory, "given explicitly"


def new_index(dim: int, factory: str, metric: str) -> faiss.Index:
    """An empty FAISS index that stores our int64 labels, so add/remove never renumber rows."""
    try:
        index = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as e:
        raise IndexInputError(f"FAISS rejects index factory {factory!r}: {_faiss_reason(e)}") from None
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


def _train(index: faiss.Index, vectors: np.ndarray, factory: str) -> None:
    if index.is_trained:
        return
    if len(vectors) > TRAIN_SAMPLE:
        vectors = vectors[np.sort(np.random.default_rng(0).choice(len(vectors), TRAIN_SAMPLE, replace=False))]
    try:
        index.train(vectors)
    except RuntimeError as e:
        raise IndexInputError(
            f"cannot train {factory!r} on {len(vectors)} vectors: {_faiss_reason(e)}"
        ) from None


def _add(index: faiss.Index, vectors: np.ndarray, labels: np.ndarray, progress: bool) -> None:
    with tqdm(total=len(vectors), unit="vec", desc="indexing", disable=not progress) as bar:
        for start in range(0, len(vectors), ADD_BATCH):
            end = start + ADD_BATCH
            index.add_with_ids(vectors[start:end], labels[start:end])
            bar.update(len(vectors[start:end]))


def build_index(
    embeddings_uri: str,
    out_uri: str,
    factory: str = "auto",
    metric: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Index every vector of an embeddings dataset into a new index folder; returns its manifest.

    metric None means "ip" when the embeddings are L2-normalised, else "l2".
    """
    embeddings_uri, out_uri = storage.normalize(embeddings_uri), storage.normalize(out_uri)
    if storage.exists(out_uri) and not overwrite:  # fail before reading what may be gigabytes
        raise storage.StorageError(f"output exists: {out_uri} (pass --overwrite to replace it)")
    ids, vectors, passthrough, meta = read_embeddings(embeddings_uri)
    ids, dim = _unique_ids(ids), vectors.shape[1]
    if meta.get("dim") and int(meta["dim"]) != dim:
        raise IndexInputError(f"embeddings metadata says dim {meta['dim']} but the vectors have {dim}")
    vectors = _matrix(vectors, dim)
    normalized = meta.get("normalized") == "true"
    metric = metric or ("ip" if normalized else "l2")
    if metric not in METRICS:
        raise IndexInputError(f"unknown metric {metric!r}: use 'ip' or 'l2'")
    factory, reason = choose_factory(factory, len(ids), dim)
    start = time.perf_counter()
    index = new_index(dim, factory, metric)
    _train(index, vectors, factory)
    labels = np.arange(len(ids), dtype=np.int64)
    _add(index, vectors, labels, progress)
    manifest = {
        "dim": dim,
        "metric": metric,
        "factory": factory,
        "reason": reason,
        "count": len(ids),
        "shards": 1,
        "fingerprint": meta.get("fingerprint") or None,
        "normalized": normalized,
        "timm_name": meta.get("timm_name", ""),
        "classes": [c for c in meta.get("classes", "").split(",") if c],
        "embeddings": embeddings_uri,
        "build_seconds": round(time.perf_counter() - start, 3),
        "faiss_version": faiss.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    idmap = pa.table({"id": pa.array(ids, pa.string()), "faiss_id": labels})
    for name in passthrough.column_names:
        idmap = idmap.append_column(name, passthrough.column(name))
    built = VectorIndex(index, idmap, manifest, out_uri)
    with storage.publish_dir(out_uri, overwrite=overwrite) as staging:
        built.write(staging)
    return built.info()


def open_index(uri: str) -> VectorIndex:
    return VectorIndex.load(uri)


def check_fingerprint(index: VectorIndex, fingerprint: str | None) -> None:
    """Refuse vectors from another model: their scores against the stored vectors mean nothing."""
    if fingerprint and index.fingerprint and fingerprint != index.fingerprint:
        raise IndexInputError(
            f"vectors come from model {fingerprint} but the index was built from model {index.fingerprint}"
        )


class VectorIndex:
    """A FAISS index (labels = `faiss_id`) and its id map, in memory.

    Every mutating method validates all of its input first, so a rejected call leaves the
    index unchanged. Changes live in memory until `save()`.
    """

    def __init__(self, index: faiss.Index, idmap: pa.Table, manifest: dict, uri: str | None = None):
        self.index, self.manifest, self.uri = index, manifest, uri
        self.dim, self.metric = int(manifest["dim"]), manifest["metric"]
        self.fingerprint = manifest.get("fingerprint")
        self._gpu = None  # a GPU copy for search, dropped whenever the CPU index changes
        self._set_idmap(idmap)

    def _set_idmap(self, idmap: pa.Table) -> None:
        # Rows stay sorted by faiss_id (labels only grow), so label -> row is a searchsorted.
        self.idmap = idmap
        self._ids = np.array(idmap.column("id").to_pylist(), dtype=object)
        self._labels = idmap.column("faiss_id").to_numpy()
        self._row = {id_: row for row, id_ in enumerate(self._ids)}

    @classmethod
    def load(cls, uri: str) -> VectorIndex:
        uri = storage.normalize(uri)
        folder = storage.download_dir(uri)
        if not (folder / MANIFEST_FILE).is_file():
            raise storage.StorageError(f"not an index (no {MANIFEST_FILE}): {uri}")
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        return cls(
            faiss.read_index(str(folder / INDEX_FILE)), pq.read_table(folder / IDS_FILE), manifest, uri
        )

    def write(self, folder) -> None:
        """Write the three files into a plain local folder (save() publishes one atomically)."""
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        pq.write_table(self.idmap, folder / IDS_FILE)
        (folder / MANIFEST_FILE).write_text(json.dumps(self.info(), indent=2))

    def save(self) -> None:
        """Atomically replace the index folder with the current state (temporary folder + rename)."""
        if self.uri is None:
            raise IndexInputError("this index has no location to save to")
        with storage.publish_dir(self.uri, overwrite=True) as staging:
            self.write(staging)
        self.manifest = self.info()

    def info(self) -> dict:
        return {**self.manifest, "count": len(self)}

    def __len__(self) -> int:
        return len(self._ids)

    def _rows(self, ids) -> np.ndarray:
        ids = [str(i) for i in ids]
        unknown = [i for i in ids if i not in self._row]
        if unknown:
            raise IndexInputError(f"unknown ids: {_few(unknown)}")
        return np.array([self._row[i] for i in ids], dtype=np.int64)

    def _searcher(self) -> faiss.Index:
        # Exact search is where a GPU pays off (adding to Flat is a memory copy, so building
        # stays on CPU); the CPU index stays the source of truth for add, remove and save.
        if self._gpu is None and faiss.get_num_gpus() > 0 and self.manifest["factory"] == "Flat":
            self._gpu = faiss.index_cpu_to_all_gpus(self.index)
        return self._gpu if self._gpu is not None else self.index

    def _search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        k = min(k, len(self))
        if k == 0 or len(queries) == 0:
            return [[] for _ in queries], np.zeros((len(queries), k), np.float32)
        scores, labels = self._searcher().search(queries, k)
        # FAISS pads with label -1 when it finds fewer than k (small index, few IVF probes).
        rows = np.searchsorted(self._labels, labels)
        return [self._ids[r[lab >= 0]].tolist() for r, lab in zip(rows, labels, strict=True)], scores

    def search(self, vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-k ids per query and scores [n, min(k, len)]; scores past len(ids[i]) are padding."""
        return self._search(_matrix(vectors, self.dim), _check_k(k))

    def reconstruct(self, ids: list[str]) -> np.ndarray:
        """The stored vectors of `ids` (decoded, so approximate for lossy codes such as PQ)."""
        labels = self._labels[self._rows(ids)]
        try:
            return self.index.reconstruct_batch(labels)
        except RuntimeError as e:
            factory = self.manifest["factory"]
            raise IndexInputError(
                f"index {factory!r} cannot return stored vectors: {_faiss_reason(e)}"
            ) from None

    def search_by_id(self, ids: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Search with the stored vectors of `ids`; each id is usually its own first hit."""
        k = _check_k(k)
        return self._search(self.reconstruct(ids), k)

    def metadata(self, ids: list[str]) -> list[dict]:
        """The passthrough columns (label, ...) of each id, as JSON-ready dicts."""
        rows = self._rows(ids)
        table = self.idmap.drop_columns(["id", "faiss_id"]).take(rows)
        if table.num_columns == 0:
            return [{} for _ in rows]
        # Round-trip through JSON so dates or bytes in passthrough columns cannot break callers.
        return json.loads(json.dumps(table.to_pylist(), default=str))

    def add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict] | None = None) -> None:
        ids, vectors = _unique_ids(ids), _matrix(vectors, self.dim)
        if len(vectors) != len(ids):
            raise IndexInputError(f"{len(ids)} ids but {len(vectors)} vectors")
        present = [i for i in ids if i in self._row]
        if present:
            raise IndexInputError(f"ids already in the index: {_few(present)}")
        if metadata is not None and len(metadata) != len(ids):
            raise IndexInputError(f"{len(ids)} ids but {len(metadata)} metadata entries")
        first = int(self._labels[-1]) + 1 if len(self._labels) else 0
        labels = np.arange(first, first + len(ids), dtype=np.int64)
        rows = [
            {**(m or {}), "id": i, "faiss_id": int(lab)}
            for i, m, lab in zip(ids, metadata or [{}] * len(ids), labels, strict=True)
        ]
        try:  # built before FAISS is touched, so bad metadata leaves the index unchanged
            idmap = pa.concat_tables([self.idmap, pa.Table.from_pylist(rows)], promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise IndexInputError(f"metadata does not fit the index's columns: {e}") from None
        _add(self.index, vectors, labels, progress=False)
        self._gpu = None
        self.idmap = idmap
        self._ids = np.concatenate([self._ids, np.array(ids, dtype=object)])
        self._labels = np.concatenate([self._labels, labels])
        self._row.update({i: len(self._row) + n for n, i in enumerate(ids)})

    def remove(self, ids: list[str]) -> None:
        rows = self._rows(_unique_ids(ids))
        try:
            removed = self.index.remove_ids(self._labels[rows])
        except RuntimeError:
            factory = self.manifest["factory"]
            raise IndexInputError(f"index {factory!r} does not support remove; rebuild it instead") from None
        if removed != len(rows):  # would mean the id map and FAISS disagree: a bug, not user input
            raise RuntimeError(f"FAISS removed {removed} vectors, expected {len(rows)}")
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self._gpu = None
        self._set_idmap(self.idmap.filter(pa.array(keep)))


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


def _search_times(index: VectorIndex, queries: np.ndarray, batch: int, k: int, reps: int, budget_s: float):
    # Cycle through the queries so repetitions do not just re-read one cached batch.
    batches = [queries[(np.arange(batch) + i * batch) % len(queries)] for i in range(reps)]
    index.search(batches[0], k)  # warm-up: first-call allocations are not search speed
    times, deadline = [], time.perf_counter() + budget_s
    for q in batches:
        if times and time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - start)
    return np.array(times)


def evaluate_index(
    index_uri: str, queries: np.ndarray | None = None, k: int = 10, num_queries: int = 200
) -> dict:
    """Recall@1/10/100/k against exact search, queries per second, latency and size of an index.

    The ground truth is an exact FAISS Flat index over the stored vectors as the index
    reconstructs them, so for lossy codes (PQ, SQ) recall measures the search, not the
    quantisation. Queries default to `num_queries` stored vectors sampled with a fixed seed.
    """
    index = open_index(index_uri)
    n, k = len(index), _check_k(k)
    if n == 0:
        raise IndexInputError("cannot evaluate an empty index")
    stored = index.reconstruct(index._ids.tolist())
    if queries is None:
        queries = stored[np.sort(np.random.default_rng(0).choice(n, min(num_queries, n), replace=False))]
    queries = _matrix(queries, index.dim)
    exact = faiss.IndexFlatIP(index.dim) if index.metric == "ip" else faiss.IndexFlatL2(index.dim)
    exact.add(stored)
    report = {
        "uri": storage.normalize(index_uri),
        "factory": index.manifest["factory"],
        "metric": index.metric,
    }
    report.update(count=n, dim=index.dim, num_queries=len(queries))
    for at in sorted({kk for kk in (1, 10, 100, k) if kk <= n}):
        exact_scores, _ = exact.search(queries, at)
        found, _ = index.search(queries, at)  # one search per k: HNSW/IVF results depend on k
        report[f"recall@{at}"] = round(_recall(index, stored, queries, found, exact_scores, at), 4)
    single = _search_times(index, queries, 1, k, reps=len(queries), budget_s=2.0)
    batched = _search_times(index, queries, 256, k, reps=5, budget_s=2.0)
    fs, path = storage.filesystem(storage.join(report["uri"], INDEX_FILE))
    report.update(
        qps_batch1=round(1.0 / float(np.median(single)), 1),
        qps_batch256=round(256 / float(np.median(batched)), 1),
        latency_ms_p50=round(1000 * float(np.percentile(single, 50)), 4),
        latency_ms_p99=round(1000 * float(np.percentile(single, 99)), 4),
        bytes_per_vector=round(fs.get_file_info(path).size / n, 1),
        build_seconds=index.manifest.get("build_seconds"),
        device="gpu" if index._gpu is not None else "cpu",
    )
    return report
