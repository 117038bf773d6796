"""A sharded build's single read of the embeddings: Ray tasks split rows into per-shard staging files.

    (used by system/index/build.py for --shards N; see its module docstring for the whole flow)

Each `partition` task streams a contiguous run of row groups and writes every row to the
staging Parquet file of its shard (crc32(id) % N) in `.partition/` of the temporary index
folder, keeping the rows of the training sample on the way. `_ray_map` runs tasks and
re-raises a user error from inside one as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from system.index.reading import BATCH_ROWS, _parquet, _sample_positions, _take_sample, _vectors
from system.index.recipes import shard_of

PARTITION_DIR = ".partition"  # staging files of a sharded build, inside the temporary index folder


def staging_file(folder: str, shard: int, reader: int) -> str:
    return str(Path(folder) / PARTITION_DIR / f"{shard:05d}-{reader:05d}.parquet")


def staging_schema(schema: pa.Schema) -> pa.Schema:
    """Staging rows: string id, label, passthrough columns, then the vector (dropped for the id map)."""
    rest = [schema.field(c) for c in schema.names if c not in ("id", "embedding")]
    return pa.schema([("id", pa.string()), ("faiss_id", pa.int64()), *rest, schema.field("embedding")])


def reader_parts(files: list[str], readers: int) -> list[tuple[list[tuple[str, list[int]]], int, int]]:
    """At most `readers` contiguous runs of row groups, about equal in rows.

    Each is ([(file, row groups)], first label, rows); a row group is never split, so a
    dataset of fewer row groups gets fewer readers.
    """
    groups = []
    for path in files:
        meta = _parquet(path).metadata
        groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    total = max(sum(rows for *_, rows in groups), 1)
    parts: dict[int, list] = {}
    start = 0
    for path, group, rows in groups:
        part = parts.setdefault(start * readers // total, [[], start, 0])
        if part[0] and part[0][-1][0] == path:
            part[0][-1][1].append(group)
        else:
            part[0].append((path, [group]))
        part[2] += rows
        start += rows
    return [tuple(p) for p in parts.values()]


def partition(
    reader: int,
    runs: list[tuple[str, list[int]]],
    first: int,
    chosen: np.ndarray,
    num_shards: int,
    folder: str,
    schema: pa.Schema,
    progress: bool = False,
) -> dict:
    """Stream `runs` once, writing each row to its shard's staging file; keep the sample rows.

    Writes one file per shard (empty ones too, so every shard has files to read) and
    returns the rows read and the rows of `chosen` (sorted labels) in this part.
    """
    writers = [
        pq.ParquetWriter(staging_file(folder, s, reader), schema, compression="none", use_dictionary=False)
        for s in range(num_shards)
    ]
    columns = [c for c in schema.names if c != "faiss_id"]
    label, sample = first, []
    try:
        for path, groups in runs:
            batches = _parquet(path).iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=columns)
            for batch in batches:
                labels = np.arange(label, label + batch.num_rows, dtype=np.int64)
                label += batch.num_rows
                sample.append(_take_sample(chosen, labels, _vectors(batch)))
                arrays = [batch.column(c) for c in columns]
                arrays[0] = arrays[0].cast(pa.string())
                rows = pa.RecordBatch.from_arrays([arrays[0], pa.array(labels), *arrays[1:]], schema=schema)
                where = shard_of(arrays[0].to_pylist(), num_shards)
                for s in np.unique(where):
                    writers[s].write_batch(rows.filter(pa.array(where == s)))
                if progress and (label - first) // 1_000_000 > (label - first - batch.num_rows) // 1_000_000:
                    print(f"index partition {reader}: {label - first} rows", flush=True)
    finally:
        for writer in writers:
            writer.close()
    dim = schema.field("embedding").type.list_size
    return {"rows": label - first, "sample": np.concatenate([np.zeros((0, dim), np.float32), *sample])}


def _ray_map(function, calls: list[tuple], on_driver_node: bool = False) -> list:
    """Run `function(*args)` for each args as Ray tasks; a user error in any is re-raised as is.

    `on_driver_node`: the tasks write into a folder only this machine sees (the local staging
    folder of a remote --out), so they must all run here, not on other nodes of a cluster.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from system.ray_env import ensure_ray

    ensure_ray()
    task = ray.remote(function)
    if on_driver_node:
        here = ray.get_runtime_context().get_node_id()
        task = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
    futures = [task.remote(*args) for args in calls]
    try:
        return ray.get(futures)
    except BaseException as e:
        # The others must end before the caller removes the folder they write into. On a
        # task's error they run to their end: ray.cancel on a task that is just finishing
        # can abort this process (a Ray check failure, "Tried to complete task that was not
        # pending", ray-project/ray#54846; it crashed a test run here). On Ctrl-C they are
        # cancelled, as the process is ending anyway.
        if isinstance(e, KeyboardInterrupt):
            for future in futures:
                ray.cancel(future)
        ray.wait(futures, num_returns=len(futures), timeout=None if isinstance(e, Exception) else 60)
        if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, ValueError):
            raise e.cause from None  # a user error inside a task: one line, as in-process
        raise


def run_partition(
    files: list[str],
    count: int,
    sample_size: int,
    num_shards: int,
    folder: str,
    schema: pa.Schema,
    progress: bool,
    on_driver_node: bool = False,
):
    """Run the partition tasks: (staging files per shard, training sample, rows read)."""
    import ray

    (Path(folder) / PARTITION_DIR).mkdir()
    chosen = _sample_positions(count, sample_size)
    parts = reader_parts(files, num_shards)
    schema_ref = ray.put(staging_schema(schema))
    calls = []
    for reader, (runs, first, rows) in enumerate(parts):
        mine = chosen[np.searchsorted(chosen, first) : np.searchsorted(chosen, first + rows)]
        calls.append((reader, runs, first, mine, num_shards, folder, schema_ref, progress))
    results = _ray_map(partition, calls, on_driver_node)
    staged = [[staging_file(folder, s, r) for r in range(len(parts))] for s in range(num_shards)]
    sample = np.concatenate([r["sample"] for r in results])
    return staged, sample, sum(r["rows"] for r in results)
