"""Batch embedding of a whole dataset with Ray Data, and the embeddings contract.

Embeddings are Parquet shards with `id`, `embedding` (fixed_size_list<float32>[d]) and
the dataset's other columns passed through (never the image bytes), plus where each row
came from: `source_uri` (its input Parquet file) and `source_row` (its position there), so
the images can be found again without a copy (the search page's thumbnails); schema metadata
holds the model fingerprint, whether vectors are L2-normalised, the Matryoshka dims
(comma-separated, empty when none) and the class names.

    repforge embed --model runs/quickstart/finetune/model --data runs/datasets/digits/test --out runs/emb

One output shard per input Parquet file (`part-00007.parquet` embeds input file 7), written
to `.<out>.partial/` beside the output as soon as all its rows are back, then the folder is
published whole. Re-running the same job after a crash skips the shards already written
(the folder's `_job.json` must match the model fingerprint and inputs; otherwise it starts
over). Memory stays flat in dataset size: the driver holds only the rows of input files
still in flight (`repforge data ingest` writes 10,000-row files).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from system import storage
from system.data.device_decode import images_to_device
from system.data.transforms import decode_threads, eval_transform


class EmbedError(ValueError):
    """A user error in an embed job: the message is one line."""


def embeddings_metadata(meta: dict, classes: list[str] | None = None) -> dict[str, str]:
    return {
        "fingerprint": meta["fingerprint"],
        "normalized": "true" if meta.get("normalize", True) else "false",
        "dim": str(meta["embedding_dim"]),
        "timm_name": meta.get("timm_name", ""),
        "matryoshka_dims": ",".join(str(int(d)) for d in meta.get("matryoshka_dims") or []),
        "classes": ",".join(classes or meta.get("classes") or []),
    }


def embeddings_table(ids, vectors: np.ndarray, passthrough: dict | None, metadata: dict) -> pa.Table:
    """The embeddings contract as one Arrow table."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    columns = {"id": pa.array([str(i) for i in ids], pa.string()), "embedding": column}
    columns.update(passthrough or {})
    table = pa.table(columns)
    return table.replace_schema_metadata(metadata)


def read_embeddings(
    uri: str, columns: list[str] | None = None
) -> tuple[list[str], np.ndarray, pa.Table, dict]:
    """(ids, vectors [n, d] float32, passthrough table, schema metadata) of an embeddings folder."""
    files = storage.parquet_files(uri)
    table = pq.read_table(files if len(files) > 1 else files[0], columns=columns)
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(files[0]).metadata or {}).items()}
    if "embedding" not in table.column_names or "id" not in table.column_names:
        raise EmbedError(f"not an embeddings dataset (needs id and embedding columns): {uri}")
    embedding = table.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    vectors = embedding.flatten().to_numpy().reshape(-1, dim).astype(np.float32, copy=False)
    ids = table.column("id").to_pylist()
    rest = table.drop_columns(["id", "embedding"])
    return ids, vectors, rest, meta


@torch.inference_mode()
def embed_images(
    model, pre: dict | None, images: list[bytes], device: str = "cpu", transform=None, gpu_decode=None
) -> np.ndarray:
    """In-process embedding of encoded images (bf16 autocast on a GPU): the Ray Data actors' path.

    JPEGs decode on the GPU when the model runs on one (`gpu_decode` None), or where
    `gpu_decode` says (system/data/device_decode.py); other rows on the CPU, by PIL."""
    transform = transform or eval_transform(pre)
    batch = images_to_device(images, transform, device, decode_threads(), gpu_decode)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        return model.embed(batch).float().cpu().numpy()


class EmbedActor:
    """Ray Data actor: loads the model once, embeds batches of rows."""

    def __init__(self, model_uri: str, classes: list[str]):
        from system.models.artifact import load_artifact

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_artifact(model_uri, self.device)
        self.transform = eval_transform(self.meta["preprocessing"])
        self.metadata = embeddings_metadata(self.meta, classes)

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch.column("image").to_pylist()
        vectors = embed_images(self.model, None, images, self.device, self.transform)
        # `path` (from include_paths) tells the driver which output shard the rows belong to.
        passthrough = {name: batch.column(name) for name in batch.column_names if name not in ("id", "image")}
        return embeddings_table(batch.column("id").to_pylist(), vectors, passthrough, self.metadata)


def gpu_node_cpus_per_gpu() -> int:
    """CPUs per GPU on the scarcest GPU node: an actor sized by it fits on every GPU node
    (the cluster's totals would count a CPU-only head's CPUs too)."""
    import ray

    shares = [
        int(node["Resources"].get("CPU", 0) // node["Resources"]["GPU"])
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("GPU", 0) > 0
    ]
    return min(shares, default=1)


def _partial_dir(out_uri: str) -> Path:
    """A fixed place per output, so a re-run finds what the crashed run wrote."""
    if storage.is_remote(out_uri):
        return Path(tempfile.gettempdir()) / f"repforge-embed-{zlib.crc32(out_uri.encode()):08x}.partial"
    out = storage.local_path(out_uri)
    return out.with_name(f".{out.name}.partial")


def _file_rows(files: list[str], limit: int | None) -> list[int]:
    rows, left = [], limit if limit else float("inf")
    for path in files:
        n = int(min(storage.parquet_rows(path), left))
        rows.append(n)
        left -= n
    return rows


def _start_partial(partial: Path, job: dict) -> set[int]:
    """Indexes of input files whose shards a previous run of the same job already wrote."""
    marker = partial / "_job.json"
    if marker.is_file() and json.loads(marker.read_text()) == job:
        return {int(p.stem.split("-")[1]) for p in partial.glob("part-*.parquet")}
    if partial.exists():
        print(f"embed: {partial} is from another job; starting over", flush=True)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    marker.write_text(json.dumps(job))
    return set()


def with_source(table: pa.Table, file_uri: str) -> pa.Table:
    """`table` plus `source_uri` and `source_row`: each row's input file and position in it."""
    if "source_uri" in table.column_names:  # an input that records its own sources keeps them
        return table
    fs, path = storage.filesystem(file_uri)
    with fs.open_input_file(path) as f:  # the id column only: the rows come back out of order
        position = {i: n for n, i in enumerate(pq.read_table(f, columns=["id"]).column("id").to_pylist())}
    rows = pa.array([position[i] for i in table.column("id").to_pylist()], pa.int64())
    table = table.append_column("source_uri", pa.array([file_uri] * len(table), pa.string()))
    return table.append_column("source_row", rows)


def _write_shard(partial: Path, number: int, parts: list[pa.Table], metadata: dict, source: str) -> None:
    table = with_source(pa.concat_tables(parts), source).replace_schema_metadata(metadata)
    tmp = partial / f".part-{number:05d}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, partial / f"part-{number:05d}.parquet")  # a shard is there whole or not at all


def run_embed(
    model_uri: str,
    data_uri: str,
    out_uri: str,
    batch_size: int = 128,
    concurrency: int | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    progress_every_s: float = 10.0,
) -> str:
    """Embed every row of `data_uri` with the model artifact; returns the embeddings URI.

    Resumable: an interrupted run of the same job continues from the shards it wrote.
    """
    import ray

    from system.data.dataset import check_dataset
    from system.models.artifact import read_meta
    from system.ray_env import ensure_ray

    model_uri, data_uri, out_uri = (storage.normalize(u) for u in (model_uri, data_uri, out_uri))
    meta = read_meta(model_uri)  # fails fast, before Ray, on a bad artifact
    classes = check_dataset(data_uri)
    if storage.exists(out_uri) and not overwrite:
        raise storage.StorageError(f"output exists: {out_uri} (pass --overwrite to replace it)")
    if limit is not None and limit < 1:
        raise EmbedError(f"limit must be a positive number of rows, got {limit}")
    files = storage.parquet_files(data_uri)
    rows = _file_rows(files, limit)
    partial = _partial_dir(out_uri)
    job = {"model": meta["fingerprint"], "files": files, "rows": rows}
    done = _start_partial(partial, job)
    pending = [i for i, n in enumerate(rows) if n and i not in done]
    total, skipped = sum(rows), sum(rows[i] for i in done)
    if done:
        print(f"embed: resuming, {len(done)} shards ({skipped} rows) already written", flush=True)
    metadata = embeddings_metadata(meta, classes)
    if pending:
        ensure_ray()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            # Two actors share each GPU, so one decodes while the other runs the model, and
            # each reserves half of its GPU node's CPUs per GPU (one left for reading):
            # JPEGs decode on the GPU (nvJPEG), the other rows (PNG, WebP...) on that many
            # threads. Decoding every row on one CPU, a GPU that embeds 12,700 img/s waited on
            # a 200 img/s JPEG decoder (benchmarks/bench_gpu.py).
            actor_gpus, actor_cpus = 0.5, max(1, (gpu_node_cpus_per_gpu() - 1) // 2)
            concurrency = concurrency or 2 * gpus
        else:
            actor_gpus, actor_cpus = 0, 1
            concurrency = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
        ds = ray.data.read_parquet([files[i] for i in pending], include_paths=True)
        # One block per batch (streaming), so a pool of actors shares even a one-file dataset;
        # otherwise each file is one block and one actor embeds it while the others wait.
        ds = ds.repartition(target_num_rows_per_block=batch_size)
        if limit:  # files past the limit have rows[i] == 0; the first rows must be the first files'
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            ds = ds.limit(sum(rows[i] for i in pending))
        embedded = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={"model_uri": model_uri, "classes": classes},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=actor_gpus,
            num_cpus=actor_cpus,
        )
        # Ray Data gives `path` without the URI scheme.
        shard_of = {files[i].split("://")[-1]: i for i in pending}
        buffers: dict[int, list[pa.Table]] = {i: [] for i in pending}
        got = dict.fromkeys(pending, 0)
        start = last = time.perf_counter()
        embedded_rows = 0
        for table in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            paths = table.column("path")
            for path in set(paths.to_pylist()):
                number = shard_of[path]
                part = table.filter(pc.equal(paths, path)).drop_columns(["path"])
                buffers[number].append(part)
                got[number] += len(part)
                if got[number] == rows[number]:
                    _write_shard(partial, number, buffers.pop(number), metadata, files[number])
            embedded_rows += len(table)
            if time.perf_counter() - last > progress_every_s:
                last = time.perf_counter()
                rate = embedded_rows / (last - start)
                print(f"embed: {skipped + embedded_rows}/{total} rows, {rate:.0f} rows/s", flush=True)
        if buffers:  # every file's rows came back, or Ray Data lost some: refuse to publish
            raise RuntimeError(f"embed: rows missing for input files {sorted(buffers)}")
        seconds = time.perf_counter() - start
        print(
            f"embed: {embedded_rows} rows in {seconds:.1f}s, {embedded_rows / seconds:.0f} rows/s", flush=True
        )
    with storage.publish_dir(out_uri, overwrite=overwrite) as staging:
        for shard in sorted(partial.glob("part-*.parquet")):
            shutil.move(str(shard), staging / shard.name)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"embedded {meta['fingerprint']} -> {out_uri} ({sum(1 for n in rows if n)} shards)", flush=True)
    return out_uri
