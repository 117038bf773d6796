"""Streaming, sharded FAISS index build from an embeddings dataset.

    repforge index build --embeddings runs/emb --out runs/index                     # auto recipe
    repforge index build --embeddings runs/emb --out runs/index --shards 4 --memory-budget 8G
    repforge index build --embeddings runs/emb --out runs/index --factory IVF4096,Flat --on-disk

How a build runs, with memory bounded by one batch of vectors plus the index itself:

1. `scan`: row counts and schema from Parquet footers only. `--factory auto` reads a
   uniform sample (one streaming pass) and measures candidate recipes on it
   (system/index/auto.py); `--on-disk` picks from the count per shard, the dimension and
   the memory budget (system/index/recipes.py).
2. One shard (in-process): the driver reads the id map (refusing duplicate ids), then a
   uniform sample (`train_sample_size` rows, one streaming pass) trains the coarse quantizer and
   PQ codebooks, on GPUs when FAISS sees any; `build_shard` then streams the Parquet with
   `iter_batches`, adds every row and writes the file.
   `--shards N`: the embeddings are read once, by `partition` Ray tasks, each over a
   contiguous run of row groups: every row goes to the staging Parquet file of its shard
   (crc32(id) % N, with its label as `faiss_id`) in `.partition/` of the temporary index
   folder, and the rows of the training sample are kept on the way. After training on
   the driver, each shard is a Ray task that streams only its own staging files, checks
   its ids are unique (a duplicate id always hashes to one shard), adds the vectors and
   writes its FAISS file and its own id map `ids-NNNNN.parquet`, saves its result, then
   deletes its staging files (a retry of the task, after its worker died, returns that
   result rather than failing on files that are gone). Neither the driver nor any task
   holds all ids, and the dataset is read once rather than once per shard (at 1B x 128
   dims, 512 GB instead of 512 GB x N), at the cost of scratch space for one copy of it
   beside the index while the build runs.
   On-disk IVF shards add in blocks that `faiss.contrib.ondisk.merge_ondisk` merges into
   one memory-mapped `.ivfdata` file. While adding, each shard keeps the exact top-10 of
   the tuning queries.
3. The driver sweeps search parameters against that exact top-10 (system/index/tune.py)
   on the FAISS shards alone (shard 0 alone when the shard files hold more than
   TUNE_WHOLE_INDEX_BYTES; the manifest's `tuned_on` says which), writes the manifest
   (`rows_read`: rows streamed from the embeddings, the count when sharded, twice it with
   one shard, plus the count for auto's sample pass), measures filtered operating points
   (system/index/filtered.py) and publishes the folder atomically; `.partition/` is gone before that,
   and a failure anywhere leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from system import storage
from system.index.api import VectorIndex
from system.index.auto import DEFAULT_TUNE_SECONDS, auto_sample_rows, select_factory
from system.index.files import IDS_FILE, MANIFEST_FILE, combine_shards, id_files, load_idmap, read_shards
from system.index.filtered import tune_filtered
from system.index.partition import PARTITION_DIR, _ray_map, run_partition
from system.index.reading import iter_batches, read_idmap, read_sample, scan
from system.index.recipes import (
    METRICS,
    IndexInputError,
    choose_factory,
    default_budget,
    faiss_reason,
    few,
    new_index,
    parse_bytes,
)
from system.index.tune import (
    TUNE_K,
    TUNE_QUERIES,
    exact_heap,
    exact_update,
    held_out_queries,
    pick_point,
    sweep,
)

TRAIN_SAMPLE = 100_000  # PQ codebooks and small coarse quantizers gain little from more points
POINTS_PER_CENTROID = 40  # k-means needs about this many per list (FAISS warns below 39)
ONDISK_BLOCK = 1_000_000  # vectors per in-RAM block before it is merged into the on-disk lists
# The search-parameter sweep after a build loads the index into the driver: the whole index
# up to this size of its shard files, else shard 0 alone with its own exact top-k. Shards are random
# 1/N slices (crc32 of the id) under one trained quantizer, so one shard's operating points
# stand for every shard's, and a billion-vector build never needs the whole index in the driver.
TUNE_WHOLE_INDEX_BYTES = 8 << 30
FILTER_TUNE_MAX_ROWS = 5_000_000  # filtered tuning decodes up to half the vectors for its ground truth


def train_sample_size(index: faiss.Index, count: int) -> int:
    """Rows to train on: TRAIN_SAMPLE, or more when the coarse quantizer has many lists
    (IVF16384 at 10M vectors trains on 655k points; 100k would leave 6 per centroid)."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = ivf.nlist if ivf is not None else 0
    return min(count, max(TRAIN_SAMPLE, POINTS_PER_CENTROID * lists))


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


def _check_unique(files: list[str]) -> None:
    # Holds this shard's ids as one Arrow column (a few bytes each), not the vectors; a
    # duplicate id hashes to one shard, so checking each shard checks the whole dataset.
    ids = pa.chunked_array([pq.read_table(f, columns=["id"]).column("id") for f in files], pa.string())
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dups = counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()
        raise IndexInputError(f"duplicate ids: {few(dups)}")


def build_shard(
    trained: bytes,
    files: list[str],
    counts: np.ndarray | None,
    shard: int,
    num_shards: int,
    folder: str,
    on_disk: bool,
    queries: np.ndarray,
    metric: str,
    progress: bool = False,
) -> dict:
    """Add this shard's rows to a copy of the trained index and write it to `folder`.

    `files` are the embeddings (with their row `counts`) for the only shard, or this
    shard's staging files (`counts` None): then the task also writes the shard's id map
    and deletes the staging files. `folder` must be reachable by the task: the local
    staging folder on one machine, a shared filesystem on a cluster. Returns the count
    and the exact top-k of `queries`.
    """
    staged = counts is None
    done = Path(folder) / PARTITION_DIR / f"shard-{shard:05d}.done.npz"
    if staged and done.exists():
        # A retry (Ray re-runs a task whose worker died) after this shard had finished and
        # begun deleting its staging files: its index and id map are written, the result saved.
        with np.load(done) as saved:
            return {"count": int(saved["count"]), "scores": saved["scores"], "labels": saved["labels"]}
    if staged:
        _check_unique(files)
        schema = pq.read_schema(files[0])
        idmap_schema = schema.remove(schema.get_field_index("embedding"))
        writer = pq.ParquetWriter(str(Path(folder) / id_files(num_shards)[shard]), idmap_schema)
    index, count, blocks = faiss.deserialize_index(trained), 0, []
    heap = exact_heap(queries, metric)
    try:
        for labels, vectors, batch in iter_batches(files, counts):
            if staged:
                writer.write_batch(batch.drop_columns(["embedding"]))
            index.add_with_ids(vectors, labels)
            exact_update(heap, queries, vectors, labels, metric)
            count += len(labels)
            if progress and (count // 1_000_000) > ((count - len(labels)) // 1_000_000):
                print(f"index shard {shard}: {count} vectors added", flush=True)
            if on_disk and index.ntotal >= ONDISK_BLOCK:
                blocks.append(_write_block(index, folder, shard, len(blocks)))
                index = faiss.deserialize_index(trained)
    finally:
        if staged:
            writer.close()
    if on_disk:
        blocks.append(_write_block(index, folder, shard, len(blocks)))
        index = _merge_on_disk(trained, blocks, folder, shard, num_shards)
    faiss.write_index(index, str(Path(folder) / shard_file(shard, num_shards)))
    heap.finalize()
    result = {"count": count, "scores": heap.D, "labels": heap.I}
    if staged:  # frees the scratch space as shards finish, not only at the end
        with open(f"{done}.tmp", "wb") as out:  # saved first, so that a retry needs no staging file
            np.savez(out, **result)
        os.replace(f"{done}.tmp", done)
        for path in files:
            os.remove(path)
    return result


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


def _run_shards(num_shards: int, files, counts, args: tuple, on_driver_node: bool = False) -> list[dict]:
    """Build every shard: in-process over the embeddings, or Ray tasks over their staging files."""
    if num_shards == 1:
        return [build_shard(args[0], files, counts, 0, 1, *args[1:])]
    import ray

    refs = [ray.put(a) for a in args]
    calls = [(refs[0], files[s], None, s, num_shards, *refs[1:]) for s in range(num_shards)]
    return _ray_map(build_shard, calls, on_driver_node)


def _prefix_dim(prefix_dim: int | None, meta: dict, dim: int, factory: str, room: bool) -> int:
    recorded = [int(d) for d in meta.get("matryoshka_dims", "").split(",") if d.strip()]
    if prefix_dim is None:  # auto: approximate auto recipes on models trained with Matryoshka dims
        usable = [d for d in recorded if dim // 4 <= d < dim]
        return min(usable) if usable and room and factory != "Flat" else 0
    if prefix_dim and not 0 < prefix_dim < dim:
        raise IndexInputError(f"--prefix-dim {prefix_dim}: must be between 1 and {dim - 1}")
    return prefix_dim


def _tune(staging: Path, manifest: dict, results: list[dict], queries, idmap, tune_seconds: float) -> None:
    """Operating points (unfiltered, then filtered) into `manifest`, measured on the staged shards."""
    # The sweep needs the FAISS shards only, never the id maps.
    index_bytes = sum(os.path.getsize(staging / name) for name in manifest["files"])  # ~ its RAM
    if manifest["shards"] > 1 and index_bytes > TUNE_WHOLE_INDEX_BYTES:
        searcher = read_shards(staging, {**manifest, "files": manifest["files"][:1]})[0]
        truth, tuned_count = results[0]["labels"], results[0]["count"]
        manifest["tuned_on"] = f"shard 0 of {manifest['shards']}"
    else:
        heap = exact_heap(queries, manifest["metric"])
        for result in results:
            heap.add_result(result["scores"], result["labels"])
        heap.finalize()
        searcher = combine_shards(manifest["dim"], read_shards(staging, manifest))
        truth, tuned_count = heap.I, manifest["count"]
        manifest["tuned_on"] = "all shards"
    points = sweep(searcher, queries, truth) if tuned_count > TUNE_K else []
    manifest["operating_points"] = points
    manifest["search_params"] = (pick_point(points, manifest["target_recall"]) or {}).get("params", {})
    if manifest["tuned_on"] == "all shards" and manifest["count"] <= FILTER_TUNE_MAX_ROWS:
        rows_shard = None
        if idmap is None:
            idmap, rows_shard = load_idmap(staging, manifest)
        shard_list = (
            [searcher] if manifest["shards"] == 1 else [searcher.at(s) for s in range(manifest["shards"])]
        )
        vindex = VectorIndex(shard_list, idmap, manifest, shard_of_row=rows_shard)
        manifest["filter_points"] = tune_filtered(
            vindex, queries, manifest["target_recall"], min(60.0, tune_seconds)
        )
        del vindex


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
    tune_seconds: float | None = None,
) -> dict:
    """Index every vector of an embeddings dataset into a new index folder; returns its manifest.

    metric None means "ip" when the embeddings are L2-normalised, else "l2". `memory_budget`
    (bytes or "8G") is per shard; `prefix_dim` None means the smallest recorded Matryoshka
    dim of at least a quarter of the full dim, for approximate recipes; 0 turns it off.
    """
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
    tune_seconds = DEFAULT_TUNE_SECONDS if tune_seconds is None else float(tune_seconds)
    if not tune_seconds > 0:
        raise IndexInputError(f"--tune-seconds must be positive, got {tune_seconds}")
    auto_record, auto_rows = None, 0
    if auto:  # measured: candidates built on a sample, the fastest at the target recall wins
        sample = read_sample(files, counts, auto_sample_rows(count), seed=2)
        factory, reason, ram, auto_record = select_factory(
            sample, per_shard, metric, budget or default_budget(), target_recall, tune_seconds
        )
        auto_rows = count
        del sample
    else:
        factory, reason, ram = choose_factory(factory, per_shard, dim, budget, on_disk)
    # The prefix re-rank keeps full float32 vectors in RAM: only when the budget has room.
    room = auto and ram + 4 * dim * per_shard <= (budget or default_budget())
    prefix = _prefix_dim(prefix_dim, meta, dim, factory, room)
    empty = new_index(dim, factory, metric, prefix, normalized)
    # merge_ondisk moves only inverted lists: a refine stage or id map would be left behind.
    wrapped = isinstance(faiss.downcast_index(empty), (faiss.IndexIDMap, faiss.IndexRefine))
    if on_disk and (faiss.try_extract_index_ivf(empty) is None or wrapped or prefix):
        raise IndexInputError(f"--on-disk needs an IVF index without refine or prefix, not {factory!r}")
    # One shard: the driver holds the id map, and refuses duplicate ids before any training.
    # Sharded: each shard task checks and writes its own part of it.
    idmap = read_idmap(files, schema) if shards == 1 else None
    start = time.perf_counter()
    # A remote --out is staged in a local folder of this machine: shard tasks must run here.
    on_driver_node = storage.is_remote(out_uri)
    with storage.publish_dir(out_uri, overwrite=overwrite) as staging:
        if shards == 1:
            sample, inputs = read_sample(files, counts, train_sample_size(empty, count)), (files, counts)
            rows_read = count
        else:
            size = train_sample_size(empty, count)
            staged, sample, rows_read = run_partition(
                files, count, size, shards, str(staging), schema, progress, on_driver_node
            )
            inputs = (staged, None)
        train_index(empty, sample, factory)
        queries = held_out_queries(sample, TUNE_QUERIES, normalized)
        del sample
        args = (faiss.serialize_index(empty), str(staging), on_disk, queries, metric, progress)
        results = _run_shards(shards, *inputs, args, on_driver_node)
        rows_read += auto_rows
        if shards == 1:
            rows_read += sum(r["count"] for r in results)
            pq.write_table(idmap, staging / IDS_FILE)
        shutil.rmtree(staging / PARTITION_DIR, ignore_errors=True)  # emptied by the shard tasks
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
            "id_files": id_files(shards),
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
            "rows_read": rows_read,
            "faiss_version": faiss.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target_recall": target_recall,
        }
        if auto_record is not None:
            manifest["auto"] = auto_record
        _tune(staging, manifest, results, queries, idmap, tune_seconds)
        del idmap
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest
