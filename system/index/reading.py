"""Streaming reads of an embeddings dataset for the index build: footers, batches, samples, the id map.

    python -c "from system.index.reading import scan; print(scan('runs/emb')[1].sum())"

Vectors are never held whole: `iter_batches` streams BATCH_ROWS rows at a time, and
`read_sample` keeps only the rows of a uniform sample on one pass.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from system import storage
from system.embed.batch import EmbedError
from system.index.recipes import as_matrix, unique_ids

BATCH_ROWS = 65_536  # bounds the temporary memory per Parquet batch and per FAISS add call


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


def _vectors(batch: pa.RecordBatch) -> np.ndarray:
    embedding = batch.column("embedding")
    dim = embedding.type.list_size
    return as_matrix(embedding.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim), dim)


def iter_batches(files: list[str], counts: np.ndarray | None):
    """(labels, vectors, Arrow batch) per batch.

    With row `counts`, `files` are embeddings read for their vectors alone, and a row's
    label is its position in the dataset. With counts None they are staging files of a
    sharded build, read whole, and the label is their `faiss_id` column.
    """
    columns = ["embedding"] if counts is not None else None
    offsets = np.concatenate([[0], np.cumsum(counts)])[:-1] if counts is not None else [None] * len(files)
    for path, first in zip(files, offsets, strict=True):
        start = None if first is None else int(first)
        for batch in _parquet(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            if start is None:
                labels = batch.column("faiss_id").to_numpy()
            else:
                labels = np.arange(start, start + batch.num_rows, dtype=np.int64)
                start += batch.num_rows
            yield labels, _vectors(batch), batch


def _sample_positions(total: int, size: int, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(total, min(size, total), replace=False))


def _take_sample(chosen: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The rows of a batch of consecutive labels whose label is in `chosen` (sorted)."""
    lo, hi = np.searchsorted(chosen, [labels[0], labels[-1] + 1]) if len(labels) else (0, 0)
    return vectors[chosen[lo:hi] - labels[0]]


def read_sample(files: list[str], counts: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of rows, in one streaming pass (no more than `size` rows held)."""
    chosen = _sample_positions(int(counts.sum()), size, seed)
    return np.concatenate([_take_sample(chosen, labels, v) for labels, v, _ in iter_batches(files, counts)])


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
