"""Streaming, sharded FAISS index build from an embeddings dataset.

    repforge index build --embeddings runs/emb --out runs/index                     # auto recipe
    repforge index build --embeddings runs/emb --out runs/index --shards 4 --memory-budget 8G
    repforge index build --embeddings runs/emb --out runs/index --factory IVF4096,Flat --on-disk

How a build runs, with memory bounded by one batch of vectors plus the index itself:

1. `scan`: row counts and schema from Parquet footers only; the recipe is chosen from the
   count per shard, the dimension and the memory budget (system/index_recipes.py).
2. A uniform sample (TRAIN_SAMPLE rows, one streaming pass) trains the coarse quantizer
   and PQ codebooks once, on the driver (on GPUs when FAISS sees any).
3. Each shard is a Ray task (in-process when there is one shard): it copies the trained
   empty index, streams the Parquet with `iter_batches`, keeps the rows whose id hashes
   to it, adds them, and writes its file. On-disk IVF shards add in blocks that
   `faiss.contrib.ondisk.merge_ondisk` merges into one memory-mapped `.ivfdata` file.
   While streaming, each shard also keeps the exact top-10 of the tuning queries.
4. The driver sweeps search parameters against that exact top-10 (system/index_tune.py),
   writes the id map and manifest, and publishes the folder atomically.

Each shard task reads the whole dataset and drops the rows of other shards: N shards read
it N times, which is cheap next to training and adding, and needs no shuffle.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from system import storage
from system.embed import EmbedError
from system.index_recipes import (
    METRICS,
    IndexInputError,
    as_matrix,
    choose_factory,
    default_budget,
    faiss_reason,
    new_index,
    parse_bytes,
    shard_of,
    unique_ids,
)
from system.index_tune import (
    TUNE_K,
    TUNE_QUERIES,
    exact_heap,
    exact_update,
    held_out_queries,
    pick_point,
    sweep,
)

BATCH_ROWS = 65_536  # bounds the temporary memory per Parquet batch and per FAISS add call
TRAIN_SAMPLE = 100_000  # k-means / PQ training gains little from more points
ONDISK_BLOCK = 1_000_000  # vectors per in-RAM block before it is merged into the on-disk lists


def _parquet(path: str) -> pq.ParquetFile:
    fs, local = storage.filesystem(path)
    return pq.ParquetFile(fs.open_input_file(local))


def scan(uri: str) -> tuple[list[str], np.ndarray, pa.Schema, dict]:
    """(files, row counts, schema, schema metadata) from the Parquet footers alone."""
    files = storage.parquet_files(uri)
    footers = [_parquet(f) for f in files]
    schema = footers[0].schema_arrow
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if "embedding" not in schema.names or "id" not in schema.names:
        raise EmbedError(f"not an embeddings dataset (needs id and embedding columns): {uri}")
    if not pa.types.is_fixed_size_list(schema.field("embedding").type):
        raise EmbedError(f"embedding column of {uri} is not a fixed_size_list<float32>[d]")
    return files, np.array([f.metadata.num_rows for f in footers], np.int64), schema, meta


def iter_batches(files: list[str], counts: np.ndarray, with_ids: bool = False):
    """(labels, vectors, ids or None) per batch; a row's label is its position in the dataset."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    columns = ["id", "embedding"] if with_ids else ["embedding"]
    for path, first in zip(files, offsets, strict=False):
        start = int(first)
        for batch in _parquet(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            embedding = batch.column("embedding")
            dim = embedding.type.list_size
            vectors = embedding.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            labels = np.arange(start, start + len(vectors), dtype=np.int64)
            start += len(vectors)
            ids = batch.column("id").to_pylist() if with_ids else None
            yield labels, as_matrix(vectors, dim), ids


def read_sample(files: list[str], counts: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of rows, in one streaming pass (no more than `size` rows held)."""
    total = int(counts.sum())
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(size, total), replace=False))
    parts = []
    for labels, vectors, _ in iter_batches(files, counts):
        lo, hi = np.searchsorted(chosen, [labels[0], labels[-1] + 1])
        parts.append(vectors[chosen[lo:hi] - labels[0]])
    return np.concatenate(parts)


def read_idmap(files: list[str], schema: pa.Schema) -> pa.Table:
    """Ids and passthrough columns (never the vectors), with `faiss_id` = the row's label."""
    columns = [c for c in schema.names if c != "embedding"]
    table = pq.read_table(files if len(files) > 1 else files[0], columns=columns)
    ids = unique_ids(table.column("id").to_pylist())
    rest = table.drop_columns(["id"])
    idmap = pa.table({"id": pa.array(ids, pa.string()), "faiss_id": np.arange(len(ids), dtype=np.int64)})
    for name in rest.column_names:
        idmap = idmap.append_column(name, rest.column(name))
    return idmap


def train_index(index: faiss.Index, sample: np.ndarray, factory: str) -> None:
    if index.is_trained:
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and faiss.get_num_gpus() > 0:
        # k-means on all GPUs; the index itself stays a CPU index (the one that is saved).
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    try:
        index.train(sample)
    except RuntimeError as e:
        message = f"cannot train {factory!r} on {len(sample)} vectors: {faiss_reason(e)}"
        raise IndexInputError(message) from None


def shard_file(shard: int, num_shards: int, suffix: str = "faiss") -> str:
    return f"index.{suffix}" if num_shards == 1 else f"index-{shard:05d}.{suffix}"


def build_shard(
    trained: np.ndarray,
    files: list[str],
    counts: np.ndarray,
    shard: int,
    num_shards: int,
    folder: str,
    on_disk: bool,
    queries: np.ndarray,
    metric: str,
    progress: bool = False,
) -> dict:
    """Add this shard's rows to a copy of the trained index and write it to `folder`.

    `folder` must be reachable by the task: the local staging folder on one machine, a
    shared filesystem on a cluster. Returns the count and the exact top-k of `queries`.
    """
    index, count, blocks = faiss.deserialize_index(trained), 0, []
    heap = exact_heap(queries, metric)
    for labels, vectors, ids in iter_batches(files, counts, with_ids=num_shards > 1):
        if num_shards > 1:
            mine = shard_of(ids, num_shards) == shard
            labels, vectors = labels[mine], vectors[mine]
        index.add_with_ids(vectors, labels)
        exact_update(heap, queries, vectors, labels, metric)
        count += len(labels)
        if progress and (count // 1_000_000) > ((count - len(labels)) // 1_000_000):
            print(f"index shard {shard}: {count} vectors added", flush=True)
        if on_disk and index.ntotal >= ONDISK_BLOCK:
            blocks.append(_write_block(index, folder, shard, len(blocks)))
            index = faiss.deserialize_index(trained)
    if on_disk:
        blocks.append(_write_block(index, folder, shard, len(blocks)))
        index = _merge_on_disk(trained, blocks, folder, shard, num_shards)
    faiss.write_index(index, str(Path(folder) / shard_file(shard, num_shards)))
    heap.finalize()
    return {"count": count, "scores": heap.D, "labels": heap.I}


def _write_block(index: faiss.Index, folder: str, shard: int, block: int) -> str:
    path = str(Path(folder) / f".block-{shard:05d}-{block:05d}.faiss")
    faiss.write_index(index, path)
    return path


def _merge_on_disk(trained, blocks: list[str], folder: str, shard: int, num_shards: int) -> faiss.Index:
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.deserialize_index(trained)
    merge_ondisk(index, blocks, str(Path(folder) / shard_file(shard, num_shards, "ivfdata")))
    ivf = faiss.extract_index_ivf(index)
    # merge_ondisk leaves the direct map empty: rebuild it so reconstruct/remove by label work.
    ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    for block in blocks:
        os.remove(block)
    return index


def _run_shards(num_shards: int, args: tuple) -> list[dict]:
    if num_shards == 1:
        return [build_shard(args[0], args[1], args[2], 0, 1, *args[3:])]
    import ray

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(build_shard)
    refs = [ray.put(a) for a in args]
    futures = [task.remote(refs[0], refs[1], refs[2], s, num_shards, *refs[3:]) for s in range(num_shards)]
    try:
        return ray.get(futures)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError):  # a user error inside a task: one line, as in-process
            raise e.cause from None
        raise


def _prefix_dim(prefix_dim: int | None, meta: dict, dim: int, factory: str, room: bool) -> int:
    recorded = [int(d) for d in meta.get("matryoshka_dims", "").split(",") if d.strip()]
    if prefix_dim is None:  # auto: approximate auto recipes on models trained with Matryoshka dims
        usable = [d for d in recorded if dim // 4 <= d < dim]
        return min(usable) if usable and room and factory != "Flat" else 0
    if prefix_dim and not 0 < prefix_dim < dim:
        raise IndexInputError(f"--prefix-dim {prefix_dim}: must be between 1 and {dim - 1}")
    return prefix_dim


def build_index(
    embeddings_uri: str,
    out_uri: str,
    factory: str = "auto",
    metric: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shards: int = 1,
    memory_budget: int | str | None = None,
    on_disk: bool = False,
    prefix_dim: int | None = None,
    target_recall: float = 0.95,
) -> dict:
    """Index every vector of an embeddings dataset into a new index folder; returns its manifest.

    metric None means "ip" when the embeddings are L2-normalised, else "l2". `memory_budget`
    (bytes or "8G") is per shard; `prefix_dim` None means the smallest recorded Matryoshka
    dim of at least a quarter of the full dim, for approximate recipes; 0 turns it off.
    """
    from system.index import VectorIndex

    embeddings_uri, out_uri = storage.normalize(embeddings_uri), storage.normalize(out_uri)
    if storage.exists(out_uri) and not overwrite:  # fail before reading what may be gigabytes
        raise storage.StorageError(f"output exists: {out_uri} (pass --overwrite to replace it)")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise IndexInputError(f"shards must be a positive integer, got {shards!r}")
    if not 0 < target_recall <= 1:
        raise IndexInputError(f"target recall must be in (0, 1], got {target_recall}")
    files, counts, schema, meta = scan(embeddings_uri)
    dim, count = schema.field("embedding").type.list_size, int(counts.sum())
    if count == 0:
        raise IndexInputError(f"no vectors in {embeddings_uri}")
    if meta.get("dim") and int(meta["dim"]) != dim:
        raise IndexInputError(f"embeddings metadata says dim {meta['dim']} but the vectors have {dim}")
    normalized = meta.get("normalized") == "true"
    metric = metric or ("ip" if normalized else "l2")
    if metric not in METRICS:
        raise IndexInputError(f"unknown metric {metric!r}: use 'ip' or 'l2'")
    if on_disk and shards > 1 and storage.is_remote(out_uri):
        raise IndexInputError("--on-disk with --shards needs a local or shared-filesystem --out")
    budget = parse_bytes(memory_budget)
    auto = factory == "auto" and not on_disk
    per_shard = -(-count // shards)
    factory, reason, ram = choose_factory(factory, per_shard, dim, budget, on_disk)
    # The prefix re-rank keeps full float32 vectors in RAM: only when the budget has room.
    room = auto and ram + 4 * dim * per_shard <= (budget or default_budget())
    prefix = _prefix_dim(prefix_dim, meta, dim, factory, room)
    idmap = read_idmap(files, schema)  # also refuses duplicate ids before any training
    start = time.perf_counter()
    empty = new_index(dim, factory, metric, prefix, normalized)
    # merge_ondisk moves only inverted lists: a refine stage or id map would be left behind.
    wrapped = isinstance(faiss.downcast_index(empty), (faiss.IndexIDMap, faiss.IndexRefine))
    if on_disk and (faiss.try_extract_index_ivf(empty) is None or wrapped or prefix):
        raise IndexInputError(f"--on-disk needs an IVF index without refine or prefix, not {factory!r}")
    sample = read_sample(files, counts, TRAIN_SAMPLE)
    train_index(empty, sample, factory)
    queries = held_out_queries(sample, TUNE_QUERIES, normalized)
    del sample
    with storage.publish_dir(out_uri, overwrite=overwrite) as staging:
        args = (faiss.serialize_index(empty), files, counts, str(staging), on_disk, queries, metric, progress)
        results = _run_shards(shards, args)
        seconds = time.perf_counter() - start
        manifest = {
            "dim": dim,
            "metric": metric,
            "factory": factory,
            "reason": reason + (f"; coarse search on {prefix} of {dim} dims, full re-rank" if prefix else ""),
            "estimated_ram_bytes": ram,
            "memory_budget": budget,
            "count": count,
            "shards": shards,
            "files": [shard_file(s, shards) for s in range(shards)],
            "on_disk": on_disk,
            "prefix_dim": prefix,
            "matryoshka_dims": [int(d) for d in meta.get("matryoshka_dims", "").split(",") if d.strip()],
            "fingerprint": meta.get("fingerprint") or None,
            "normalized": normalized,
            "timm_name": meta.get("timm_name", ""),
            "classes": [c for c in meta.get("classes", "").split(",") if c],
            "embeddings": embeddings_uri,
            "build_seconds": round(seconds, 3),
            "build_vectors_per_s": round(count / max(seconds, 1e-9), 1),
            "build_device": "gpu" if faiss.get_num_gpus() > 0 else "cpu",
            "faiss_version": faiss.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target_recall": target_recall,
        }
        built = VectorIndex.load_local(staging, idmap, manifest, out_uri)
        heap = exact_heap(queries, metric)
        for result in results:
            heap.add_result(result["scores"], result["labels"])
        heap.finalize()
        points = sweep(built.index, queries, heap.I) if len(built) > TUNE_K else []
        built.manifest["operating_points"] = points
        built.manifest["search_params"] = (pick_point(points, target_recall) or {}).get("params", {})
        built.apply_search_params()
        built.write(staging, faiss_files=False)
    return built.info()
