"""FAISS index over an embeddings dataset: open, search, update, evaluate (build: system/index/build.py).

    repforge index build --embeddings runs/emb --out runs/index                # auto recipe, tuned
    repforge index build --embeddings runs/emb --out runs/index --factory IVF256,Flat --shards 4
    repforge index eval --index runs/index

An index is a folder (the Index contract in DESIGN.md), always published whole with
`storage.publish_dir`, so a crash never leaves a half index:

    index.faiss     the FAISS index (a CPU index, even when searched on a GPU); with
                    --shards N, index-00000.faiss ... one per shard, split by id hash
    index*.ivfdata  with --on-disk: the memory-mapped inverted lists of each shard
    ids.parquet     the id map: string `id`, int64 `faiss_id` (the label FAISS returns) and
                    the passthrough columns of the embeddings (label, ...), the columnar
                    attribute store that `search(..., filter=...)` filters on (add() and
                    remove() keep it in step with the vectors); with --shards N,
                    ids-00000.parquet ... one per shard, each written by its shard's build
                    task (indexes built before per-shard id maps have one ids.parquet:
                    they still open, and save() writes them in the per-shard layout)
    manifest.json   dim, metric, factory and why it was chosen, count, shards, prefix dim,
                    model fingerprint, normalized, classes, build seconds, the tuned
                    operating points and the search parameters in use, faiss version

Scores: metric "ip" gives inner products (higher is better; cosine similarity for
L2-normalised vectors), metric "l2" gives squared L2 distances (lower is better).
Vectors are stored and searched as given, never re-normalised: queries must come from the
same model as the index (see `check_fingerprint`), which normalises them the same way.
Shards are searched together with faiss.IndexShards, which merges the per-shard top-k
exactly (scatter-gather in threads). FAISS labels are unique across shards, so one
label -> id table (the shard id maps merged in label order) serves all of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from system import storage
from system.index.files import INDEX_FILE, MANIFEST_FILE, combine_shards, id_files, load_idmap, read_shards
from system.index.filtered import ann_search, exact_search, filter_device, plan, post_search
from system.index.filters import HIDDEN, parse_filter, terms_mask
from system.index.recipes import (
    IndexInputError,
    as_matrix,
    choose_factory,
    faiss_reason,
    few,
    new_index,
    shard_of,
    unique_ids,
)
from system.index.tune import pick_point, set_search_params
from system.models.artifact import same_model

__all__ = [
    "IndexInputError",
    "VectorIndex",
    "check_fingerprint",
    "choose_factory",
    "new_index",
    "open_index",
]


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexInputError(f"k must be a positive integer, got {k!r}")
    return int(k)


def open_index(uri: str, target_recall: float | None = None) -> VectorIndex:
    """Load an index folder; `target_recall` re-picks the operating point the build measured."""
    index = VectorIndex.load(uri)
    if target_recall is not None:
        index.set_target_recall(target_recall)
    return index


def check_fingerprint(index: VectorIndex, fingerprint: str | None) -> None:
    """Refuse vectors from another model: their scores against the stored vectors mean nothing."""
    if not same_model(fingerprint, index.fingerprint):
        raise IndexInputError(
            f"vectors come from model {fingerprint} but the index was built from model {index.fingerprint}"
        )


class VectorIndex:
    """FAISS shard indexes (labels = `faiss_id`) and their id map, in memory.

    Every mutating method validates all of its input first, so a rejected call leaves the
    index unchanged. Changes live in memory until `save()`. An id lives in shard
    crc32(id) % shards, for add and remove as for the build.
    """

    def __init__(
        self, shards, idmap: pa.Table, manifest: dict, uri: str | None = None, folder=None, shard_of_row=None
    ):
        self.shards = list(shards) if isinstance(shards, (list, tuple)) else [shards]
        self.manifest, self.uri = manifest, uri
        self.dim, self.metric = int(manifest["dim"]), manifest["metric"]
        self.fingerprint = manifest.get("fingerprint")
        self.index = combine_shards(self.dim, self.shards)
        self._folder = Path(folder) if folder is not None else None  # where on-disk lists live now
        self._gpu = None  # a GPU copy for search, dropped whenever the CPU index changes
        self._set_idmap(idmap, shard_of_row)
        self.apply_search_params()

    def _set_idmap(self, idmap: pa.Table, shard_of_row: np.ndarray | None = None) -> None:
        # Rows stay sorted by faiss_id (labels only grow), so label -> row is a searchsorted.
        self.idmap = idmap
        self._ids = np.array(idmap.column("id").to_pylist(), dtype=object)
        self._labels = idmap.column("faiss_id").to_numpy()
        self._row = {id_: row for row, id_ in enumerate(self._ids)}
        # The shard of each row (crc32(id) % shards), kept so save() splits the id map without rehashing.
        if shard_of_row is None:
            shard_of_row = shard_of(self._ids, len(self.shards))
        self._shard = np.asarray(shard_of_row, dtype=np.int32)

    @classmethod
    def load(cls, uri: str) -> VectorIndex:
        uri = storage.normalize(uri)
        folder = storage.download_dir(uri)
        if not (folder / MANIFEST_FILE).is_file():
            raise storage.StorageError(f"not an index (no {MANIFEST_FILE}): {uri}")
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        idmap, shard_of_row = load_idmap(folder, manifest)
        return cls(read_shards(folder, manifest), idmap, manifest, uri, folder, shard_of_row)

    def write(self, folder) -> None:
        """Write the files into a plain local folder (save() publishes one atomically)."""
        folder = Path(folder)
        for name, shard in zip(self.manifest.get("files", [INDEX_FILE]), self.shards, strict=True):
            if self.manifest.get("on_disk"):  # the index file only points at its lists
                lists = Path(name).with_suffix(".ivfdata")
                shutil.copyfile(self._folder / lists, folder / lists)
            faiss.write_index(shard, str(folder / name))
        names = id_files(len(self.shards))
        for s, name in enumerate(names):
            part = self.idmap if len(names) == 1 else self.idmap.filter(pa.array(self._shard == s))
            pq.write_table(part, folder / name)
        (folder / MANIFEST_FILE).write_text(json.dumps({**self.info(), "id_files": names}, indent=2))

    def save(self) -> None:
        """Atomically replace the index folder with the current state (temporary folder + rename)."""
        if self.uri is None:
            raise IndexInputError("this index has no location to save to")
        with storage.publish_dir(self.uri, overwrite=True) as staging:
            self.write(staging)
        self.manifest = {**self.info(), "id_files": id_files(len(self.shards))}
        if self.manifest.get("on_disk"):  # re-open the lists at their new place
            fresh = VectorIndex.load(self.uri)
            self.shards, self.index, self._folder = fresh.shards, fresh.index, fresh._folder

    def apply_search_params(self) -> None:
        params = self.manifest.get("search_params") or {}
        set_search_params(self.index, params)
        if self._gpu is not None:
            for name, value in params.items():
                if name == "nprobe":
                    faiss.GpuParameterSpace().set_index_parameter(self._gpu, name, value)

    def set_target_recall(self, target: float) -> dict:
        """Use the cheapest measured operating point with recall@10 >= target; returns its params."""
        if not 0 < target <= 1:
            raise IndexInputError(f"target recall must be in (0, 1], got {target}")
        point = pick_point(self.manifest.get("operating_points") or [], target)
        self.manifest = {**self.manifest, "target_recall": target}
        if point is not None:
            self.manifest["search_params"] = point["params"]
        self.apply_search_params()
        return self.manifest.get("search_params", {})

    def info(self) -> dict:
        return {**self.manifest, "count": len(self)}

    def describe(self) -> dict:
        """What `repforge index info` prints: the manifest's summary and where search and filtering run."""
        keys = ("dim", "metric", "factory", "reason", "shards", "search_params", "target_recall", "auto")
        out = {k: self.manifest[k] for k in keys if k in self.manifest}
        gpu = faiss.get_num_gpus() > 0 and "HNSW" not in self.manifest["factory"]
        out.update(count=len(self), search_device="gpu" if gpu else "cpu", filter_device=filter_device())
        out["filterable"] = {f.name: str(f.type) for f in self.idmap.schema if f.name not in HIDDEN}
        out["filter_points"] = self.manifest.get("filter_points", [])
        return out

    def __len__(self) -> int:
        return len(self._ids)

    def _rows(self, ids) -> np.ndarray:
        ids = [str(i) for i in ids]
        unknown = [i for i in ids if i not in self._row]
        if unknown:
            raise IndexInputError(f"unknown ids: {few(unknown)}")
        return np.array([self._row[i] for i in ids], dtype=np.int64)

    def _searcher(self) -> faiss.Index:
        # Flat and IVF search is where GPUs pay off; the CPU shards stay the source of truth
        # for add, remove and save. HNSW, on-disk lists and prefix transforms stay on CPU.
        m = self.manifest
        gpu_ok = "HNSW" not in m["factory"] and not m.get("on_disk") and not m.get("prefix_dim")
        if self._gpu is None and gpu_ok and faiss.get_num_gpus() > 0:
            self._gpu = combine_shards(self.dim, [faiss.index_cpu_to_all_gpus(s) for s in self.shards])
            self.apply_search_params()
        return self._gpu if self._gpu is not None else self.index

    def _search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        k = min(k, len(self))
        if k == 0 or len(queries) == 0:
            return [[] for _ in queries], np.zeros((len(queries), k), np.float32)
        tombstones = self.manifest.get("tombstones", 0)
        # Ask for as many more as there are tombstones, so k live hits remain after skipping them.
        scores, labels = self._searcher().search(queries, k + tombstones)
        # FAISS pads with label -1 when it finds fewer than k (small index, few IVF probes).
        rows = np.minimum(np.searchsorted(self._labels, labels), len(self._labels) - 1)
        live = (labels >= 0) & (self._labels[rows] == labels)
        if not tombstones:
            return [self._ids[r[ok]].tolist() for r, ok in zip(rows, live, strict=True)], scores
        worst = np.finfo(np.float32).max * (-1 if self.metric == "ip" else 1)  # FAISS's own padding
        found, kept = [], np.full((len(queries), k), worst, np.float32)
        for q, (r, ok) in enumerate(zip(rows, live, strict=True)):
            at = np.flatnonzero(ok)[:k]
            found.append(self._ids[r[at]].tolist())
            kept[q, : len(at)] = scores[q, at]
        return found, kept

    def search(self, vectors: np.ndarray, k: int, filter=None) -> tuple[list[list[str]], np.ndarray]:
        """Top-k ids per query and scores [n, min(k, len)]; scores past len(ids[i]) are padding.

        `filter` (a dict or its JSON text, see system/index/filters.py) keeps only the rows
        whose attributes match: fewer than k matches give as many hits as there are, none
        gives empty lists. A bad filter raises FilterError and changes nothing.
        """
        queries, k = as_matrix(vectors, self.dim), check_k(k)
        terms = parse_filter(filter, self.idmap.schema)
        if terms is None:
            return self._search(queries, k)
        return self.search_rows(queries, k, terms_mask(terms, self.idmap))

    def search_rows(self, queries: np.ndarray, k: int, mask: np.ndarray, strategy: str | None = None):
        """Search among the id map rows set in `mask`; `strategy` "exact"/"ann"/"post" overrides the plan."""
        rows = np.flatnonzero(mask)
        k = min(k, len(rows))
        if k == 0 or len(queries) == 0:
            return [[] for _ in queries], np.zeros((len(queries), k), np.float32)
        labels = self._labels[rows]
        chosen, params = plan(self.manifest, self.index, len(rows) / len(self), len(rows))
        how = strategy or chosen
        if how == "exact":
            try:
                scores, found = exact_search(self.shards, queries, k, labels, self._shard[rows], self.metric)
            except RuntimeError:  # codes FAISS cannot decode (reconstruct): widest selector search
                how, params = "ann", {**params, "nprobe": 1 << 20, "efSearch": 4096}
        if how in ("ann", "post"):
            allowed = np.zeros(int(self._labels.max()) + 1, bool)
            allowed[labels] = True
        if how == "post":
            if not params["post_factor"]:  # not tuned: every row, so none is missed
                params = {**params, "post_factor": len(self)}
            scores, found = post_search(self.index, self.shards, queries, k, allowed, params, self.metric)
        elif how == "ann":
            scores, found = ann_search(self.shards, queries, k, allowed, params, self.metric)
        at = np.minimum(np.searchsorted(self._labels, found), len(self._labels) - 1)
        return [self._ids[r[f >= 0]].tolist() for r, f in zip(at, found, strict=True)], scores

    def reconstruct(self, ids: list[str]) -> np.ndarray:
        """The stored vectors of `ids` (decoded, so approximate for lossy codes such as PQ)."""
        rows = self._rows(ids)
        labels, where = self._labels[rows], self._shard[rows]
        out = np.zeros((len(rows), self.dim), np.float32)
        try:
            for s, shard in enumerate(self.shards):
                if (mine := where == s).any():
                    out[mine] = shard.reconstruct_batch(labels[mine])
        except RuntimeError as e:
            factory = self.manifest["factory"]
            reason = faiss_reason(e)
            raise IndexInputError(f"index {factory!r} cannot return stored vectors: {reason}") from None
        return out

    def search_by_id(self, ids: list[str], k: int, filter=None) -> tuple[list[list[str]], np.ndarray]:
        """Search with the stored vectors of `ids`; each id is usually its own first hit."""
        k = check_k(k)
        parse_filter(filter, self.idmap.schema)  # a bad filter fails before any search
        return self.search(self.reconstruct(ids), k, filter)

    def metadata(self, ids: list[str]) -> list[dict]:
        """The passthrough columns (label, ...) of each id, as JSON-ready dicts."""
        rows = self._rows(ids)
        table = self.idmap.drop_columns(["id", "faiss_id"]).take(rows)
        if table.num_columns == 0:
            return [{} for _ in rows]
        # Round-trip through JSON so dates or bytes in passthrough columns cannot break callers.
        return json.loads(json.dumps(table.to_pylist(), default=str))

    def _writable(self, what: str) -> None:
        if self.manifest.get("on_disk"):
            # Its lists are memory-mapped from the published folder: changing them in place
            # would break the all-or-nothing save.
            raise IndexInputError(f"an on-disk index is read-only: rebuild it instead of {what}")

    def add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict] | None = None) -> None:
        ids, vectors = unique_ids(ids), as_matrix(vectors, self.dim)
        if len(vectors) != len(ids):
            raise IndexInputError(f"{len(ids)} ids but {len(vectors)} vectors")
        present = [i for i in ids if i in self._row]
        if present:
            raise IndexInputError(f"ids already in the index: {few(present)}")
        if metadata is not None and len(metadata) != len(ids):
            raise IndexInputError(f"{len(ids)} ids but {len(metadata)} metadata entries")
        self._writable("add")
        first = max(
            int(self._labels.max()) + 1 if len(self._labels) else 0, self.manifest.get("next_label", 0)
        )
        labels = np.arange(first, first + len(ids), dtype=np.int64)
        rows = [
            {**(m or {}), "id": i, "faiss_id": int(lab)}
            for i, m, lab in zip(ids, metadata or [{}] * len(ids), labels, strict=True)
        ]
        try:  # built before FAISS is touched, so bad metadata leaves the index unchanged
            new = pa.Table.from_pylist(rows)
            for name in set(new.column_names) & set(self.idmap.column_names):
                # Attributes keep the index's column types (an int16 label stays filterable as one).
                at = new.column_names.index(name)
                new = new.set_column(at, name, new.column(name).cast(self.idmap.schema.field(name).type))
            idmap = pa.concat_tables([self.idmap, new], promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise IndexInputError(f"metadata does not fit the index's columns: {e}") from None
        where = shard_of(ids, len(self.shards))
        for s, shard in enumerate(self.shards):
            if (mine := where == s).any():
                shard.add_with_ids(vectors[mine], labels[mine])
        self._gpu = None
        self.idmap = idmap
        self._ids = np.concatenate([self._ids, np.array(ids, dtype=object)])
        self._labels = np.concatenate([self._labels, labels])
        self._shard = np.concatenate([self._shard, where.astype(np.int32)])
        self._row.update({i: len(self._row) + n for n, i in enumerate(ids)})

    def remove(self, ids: list[str]) -> None:
        """Remove `ids`. Indexes FAISS cannot remove from (HNSW, Refine) keep the vectors as
        tombstones: out of the id map, skipped at search, gone at the next rebuild."""
        ids = unique_ids(ids)
        rows = self._rows(ids)
        self._writable("remove")
        labels, where = self._labels[rows], self._shard[rows]
        tombstoned = 0
        for s, shard in enumerate(self.shards):
            if not (mine := where == s).any():
                continue
            try:  # FAISS removes from a sub-index before its id map, so a refusal changes nothing
                removed = shard.remove_ids(labels[mine])
            except RuntimeError:  # not supported by this index type
                tombstoned += int(mine.sum())
                continue
            if removed != mine.sum():  # the id map and FAISS would disagree: a bug, not user input
                raise RuntimeError(f"FAISS removed {removed} vectors, expected {int(mine.sum())}")
        # Labels are never reused, so a tombstone's label cannot come back with another vector.
        next_label = max(self.manifest.get("next_label", 0), int(self._labels.max()) + 1)
        self.manifest = {
            **self.manifest,
            "next_label": next_label,
            "tombstones": self.manifest.get("tombstones", 0) + tombstoned,
        }
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self._gpu = None
        self._set_idmap(self.idmap.filter(pa.array(keep)), self._shard[keep])
