"""Batch embedding of a whole dataset with Ray Data, and the embeddings contract.

Embeddings are Parquet shards with `id`, `embedding` (fixed_size_list<float32>[d]) and
the dataset's other columns passed through (never the image bytes); schema metadata
holds the model fingerprint, whether vectors are L2-normalised, and the class names.

    repforge embed --model runs/quickstart/finetune/model --data runs/datasets/digits/test --out runs/emb
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from system import storage
from system.transforms import eval_transform, images_to_tensor


class EmbedError(ValueError):
    """A user error in an embed job: the message is one line."""


def embeddings_metadata(meta: dict, classes: list[str] | None = None) -> dict[str, str]:
    return {
        "fingerprint": meta["fingerprint"],
        "normalized": "true" if meta.get("normalize", True) else "false",
        "dim": str(meta["embedding_dim"]),
        "timm_name": meta.get("timm_name", ""),
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
def embed_images(model, pre: dict, images: list[bytes], device: str = "cpu") -> np.ndarray:
    """In-process embedding of encoded images: the same path Ray Data actors and Serve use."""
    batch = torch.from_numpy(images_to_tensor(images, eval_transform(pre))).to(device)
    return model.embed(batch).float().cpu().numpy()


class EmbedActor:
    """Ray Data actor: loads the model once, embeds batches of rows."""

    def __init__(self, model_uri: str, classes: list[str]):
        from system.models import load_artifact

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_artifact(model_uri, self.device)
        self.transform = eval_transform(self.meta["preprocessing"])
        self.metadata = embeddings_metadata(self.meta, classes)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch.column("image").to_pylist()
        tensor = torch.from_numpy(images_to_tensor(images, self.transform)).to(self.device)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            vectors = self.model.embed(tensor).float().cpu().numpy()
        passthrough = {name: batch.column(name) for name in batch.column_names if name not in ("id", "image")}
        return embeddings_table(batch.column("id").to_pylist(), vectors, passthrough, self.metadata)


def run_embed(
    model_uri: str,
    data_uri: str,
    out_uri: str,
    batch_size: int = 128,
    concurrency: int | None = None,
    limit: int | None = None,
    overwrite: bool = False,
) -> str:
    """Embed every row of `data_uri` with the model artifact; returns the embeddings URI."""
    import ray

    from system.data import read_classes, read_dataset
    from system.models import read_meta

    model_uri, data_uri, out_uri = (storage.normalize(u) for u in (model_uri, data_uri, out_uri))
    meta = read_meta(model_uri)  # fails fast, before Ray, on a bad artifact
    classes = read_classes(data_uri)
    if storage.exists(out_uri) and not overwrite:
        raise storage.StorageError(f"output exists: {out_uri} (pass --overwrite to replace it)")
    if not ray.is_initialized():
        ray.init()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if concurrency is None:
        concurrency = max(1, gpus) if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    ds = read_dataset(data_uri, limit=limit)
    embedded = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"model_uri": model_uri, "classes": classes},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if gpus else 0,
    )
    with storage.publish_dir(out_uri, overwrite=overwrite) as staging:
        # Shards are written by the driver so every file carries the schema metadata;
        # the pipeline still streams (decode + inference run in the actor pool).
        shard = 0
        for table in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = table.replace_schema_metadata(embeddings_metadata(meta, classes))
            pq.write_table(table, staging / f"part-{shard:05d}.parquet")
            shard += 1
    print(f"embedded {meta['fingerprint']} -> {out_uri} ({shard} shards)", flush=True)
    return out_uri
