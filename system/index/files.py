"""The files of an index folder (the Index contract in DESIGN.md): names, shards, id maps.

Shared by the builder (system/index/build.py) and the reader (system/index/api.py), so
neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "ids.parquet", "manifest.json"


def id_files(num_shards: int) -> list[str]:
    """The id map files of an index with `num_shards` shards, in shard order."""
    return [IDS_FILE] if num_shards == 1 else [f"ids-{s:05d}.parquet" for s in range(num_shards)]


def read_shards(folder, manifest: dict) -> list[faiss.Index]:
    """The FAISS shard indexes of an index folder (no id map)."""
    # On-disk lists are found beside the index file wherever the folder has moved to.
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if manifest.get("on_disk") else 0
    return [faiss.read_index(str(Path(folder) / f), flags) for f in manifest.get("files", [INDEX_FILE])]


def load_idmap(folder, manifest: dict) -> tuple[pa.Table, np.ndarray | None]:
    """(id map sorted by faiss_id, shard of each row or None when the layout does not say)."""
    names = manifest.get("id_files", [IDS_FILE])
    if len(names) == 1:
        return pq.read_table(Path(folder) / names[0]), None
    parts = [pq.read_table(Path(folder) / name) for name in names]
    idmap = pa.concat_tables(parts, promote_options="default")
    shard = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts])
    # Each shard's rows are in label order; labels interleave across shards.
    order = np.argsort(idmap.column("faiss_id").to_numpy(), kind="stable")
    return idmap.take(order), shard[order]


def combine_shards(dim: int, shards: list) -> faiss.Index:
    if len(shards) == 1:
        return shards[0]
    combined = faiss.IndexShards(dim, True, False)  # threaded; labels kept as each shard stores them
    for shard in shards:
        combined.add_shard(shard)
    return combined
