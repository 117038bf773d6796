"""The dataset contract and everything that reads or writes it.

A dataset is Parquet (one file or a folder of shards) with `id` (string, unique),
`image` (encoded JPEG/PNG/WebP bytes), optional `label` (int) and any other columns as
metadata; schema metadata `classes` = comma-separated class names.

    repforge data ingest ./my_images --out ./datasets/mine
    repforge data info ./datasets/mine
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from system import storage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs well before they exhaust memory
# What a dataset's `image` holds (ingest converts others to PNG). PIL names many phone
# photos "MPO": a JPEG with extra frames that every JPEG decoder reads as a JPEG.
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}


class DataError(ValueError):
    """A user error about a dataset: the message is one line."""


def dataset_schema(
    with_label: bool, classes: list[str] | None, extra: dict | None = None, columns: list | None = None
) -> pa.Schema:
    """The contract's schema; `columns`: further pyarrow fields, kept as metadata columns."""
    fields = [pa.field("id", pa.string()), pa.field("image", pa.binary())]
    if with_label:
        fields.append(pa.field("label", pa.int16()))
    fields += columns or []
    bad = [name for name in classes or [] if "," in name]
    if bad:  # the `classes` metadata is comma-separated: a comma would shift every later name
        raise DataError(
            f"class name {bad[0]!r} holds a comma; rename it (class names are stored comma-separated)"
        )
    metadata = {"classes": ",".join(classes or [])}
    metadata.update(extra or {})
    return pa.schema(fields, metadata=metadata)


def check_image(data: bytes) -> str | None:
    """None when `data` decodes as an image, otherwise the reason it does not."""
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                return f"too many pixels ({width}x{height})"
            img.load()  # a full decode: verify() misses truncated JPEG payloads
    except Exception as err:  # PIL raises many types for bad files; each is a rejection
        return f"not a readable image ({type(err).__name__}: {str(err)[:120]})"
    return None


def contract_format(data: bytes) -> bytes:
    """`data` itself when it is JPEG, PNG or WebP; other formats (BMP, GIF, TIFF) re-encoded as PNG."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format in IMAGE_FORMATS:
            return data
        out = io.BytesIO()
        img.convert("RGBA" if "A" in img.getbands() else "RGB").save(out, format="PNG")
        return out.getvalue()


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


# -- ingest ---------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    # Hidden files and everything under hidden folders (.ipynb_checkpoints, .git, a staging
    # folder of ours) are not data.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _from_folder(src: Path) -> tuple[list[str] | None, Iterator[tuple[str, bytes, int | None, dict]]]:
    """ImageFolder (one subfolder per class) when the top level has folders and no images, else flat.

    Top-level files that are not images (a README, a licence) do not turn an ImageFolder flat.
    """
    entries = [p for p in src.iterdir() if not p.name.startswith(".")]
    class_dirs = sorted(p for p in entries if p.is_dir())
    loose_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if class_dirs and not loose_images:
        classes = [p.name for p in class_dirs]

        def rows():
            for label, folder in enumerate(class_dirs):
                for path in _image_files(folder):
                    yield path.relative_to(src).as_posix(), path.read_bytes(), label, {}

        return classes, rows()

    def flat_rows():
        for path in _image_files(src):
            yield path.relative_to(src).as_posix(), path.read_bytes(), None, {}

    return None, flat_rows()


def _from_parquet(src: str, image_col: str, label_col: str | None, id_col: str | None):
    files = storage.parquet_files(src)
    schema = pq.read_schema(files[0])
    names = schema.names
    if image_col not in names:
        raise DataError(f"--image-col: no column {image_col!r} in {src} (columns: {', '.join(names)})")
    if label_col is None and "label" in names:
        label_col = "label"
    if label_col is not None and label_col not in names:
        raise DataError(f"--label-col: no column {label_col!r} in {src}")
    if label_col is not None and not pa.types.is_integer(schema.field(label_col).type):
        raise DataError(
            f"--label-col: column {label_col!r} in {src} must hold integer class indices,"
            f" not {schema.field(label_col).type}"
        )
    if id_col is None and "id" in names:
        id_col = "id"
    if id_col is not None and id_col not in names:
        raise DataError(f"--id-col: no column {id_col!r} in {src}")
    classes = _parquet_class_names(schema, label_col)
    if label_col and classes is None:  # labels without names: name them by their number
        top = max(pq.read_table(f, columns=[label_col])[label_col].to_numpy().max(initial=0) for f in files)
        classes = [str(i) for i in range(int(top) + 1)]
    # Every other column is metadata, carried into embeddings and search hits (the
    # contract's own names cannot be reused for it).
    kept = [schema.field(c) for c in names if c not in (id_col, image_col, label_col, "id", "image", "label")]
    columns = [c for c in (id_col, image_col, label_col) if c] + [f.name for f in kept]

    def rows():
        position = 0
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=columns):
                data = batch.to_pydict()
                for i, image in enumerate(data[image_col]):
                    if isinstance(image, dict):  # Hugging Face datasets: struct<bytes, path>
                        image = image.get("bytes")
                    row_id = str(data[id_col][i]) if id_col else f"{position:09d}"
                    label = data[label_col][i] if label_col else None
                    position += 1
                    extra = {f.name: data[f.name][i] for f in kept}
                    yield row_id, image, None if label is None else int(label), extra

    return classes, rows(), label_col is not None, kept


def _parquet_class_names(schema: pa.Schema, label_col: str | None) -> list[str] | None:
    """Class names from our `classes` metadata, or from a Hugging Face dataset's ClassLabel."""
    meta = schema.metadata or {}
    if meta.get(b"classes"):
        return meta[b"classes"].decode().split(",")
    if label_col and meta.get(b"huggingface"):
        try:
            features = json.loads(meta[b"huggingface"])["info"]["features"]
            return list(features[label_col]["names"])
        except (KeyError, TypeError, ValueError):
            return None
    return None


def ingest(
    src: str,
    out: str,
    image_col: str = "image",
    label_col: str | None = None,
    id_col: str | None = None,
    shard_rows: int = 10_000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write `src` as canonical sharded Parquet under `out`; returns a summary dict.

    Streaming: rows are read one at a time and flushed every `shard_rows`, so memory
    is bounded by one shard (plus the set of ids, needed to refuse duplicates).
    """
    if shard_rows < 1:
        raise DataError("--shard-rows: must be at least 1")
    if not storage.is_remote(src) and not Path(src).exists():
        raise DataError(f"no such source: {src} (expected an image folder or Parquet)")
    if (
        storage.is_remote(src)
        or str(src).endswith(".parquet")
        or (Path(src).is_dir() and any(Path(src).glob("*.parquet")))
    ):
        classes, rows, with_label, kept = _from_parquet(src, image_col, label_col, id_col)
    elif Path(src).is_dir():
        classes, rows = _from_folder(Path(src))
        with_label, kept = classes is not None, []
    else:
        raise DataError(f"not an image folder or Parquet: {src}")

    schema = dataset_schema(with_label, classes, {"source": str(src)}, kept)
    seen: set[str] = set()
    buffer: dict[str, list] = {name: [] for name in schema.names}
    counts = {"rows": 0, "rejected": 0, "shards": 0}
    first_reason = None
    with (
        storage.publish_dir(out, overwrite=overwrite) as staging,
        open(staging / "_rejected.jsonl", "w") as rejected,
    ):

        def flush():
            if not buffer["id"]:
                return
            table = pa.table(buffer, schema=schema)
            pq.write_table(table, staging / f"part-{counts['shards']:05d}.parquet")
            counts["shards"] += 1
            for values in buffer.values():
                values.clear()

        for row_id, image, label, extra in tqdm(rows, desc="ingest", unit="img", disable=not progress):
            if row_id in seen:
                raise DataError(f"duplicate id {row_id!r} in {src}")
            seen.add(row_id)
            reason = check_image(image)
            if reason is not None:
                rejected.write(json.dumps({"id": row_id, "reason": reason}) + "\n")
                counts["rejected"] += 1
                first_reason = first_reason or f"{row_id}: {reason}"
                continue
            buffer["id"].append(row_id)
            buffer["image"].append(contract_format(image))
            if with_label:
                buffer["label"].append(label)
            for name, value in extra.items():
                buffer[name].append(value)
            counts["rows"] += 1
            if len(buffer["id"]) >= shard_rows:
                flush()
        flush()
        if counts["rows"] == 0:
            # The staging folder (and its _rejected.jsonl) is dropped: say why here.
            detail = f"{counts['rejected']} rejected, first {first_reason}" if first_reason else "empty"
            raise DataError(f"no readable images in {src} ({detail})")
    return {**counts, "classes": classes or [], "out": storage.normalize(out)}


# -- reading --------------------------------------------------------------------------


def read_classes(uri: str) -> list[str]:
    meta = pq.read_schema(storage.parquet_files(uri)[0]).metadata or {}
    text = meta.get(b"classes", b"").decode()
    return text.split(",") if text else []


def check_dataset(uri: str, need_label: bool = False) -> list[str]:
    """The dataset's class names, after checking its schema is the dataset contract's.

    Reads one file's schema, no rows: called before any Ray work, so a wrong folder (an
    embeddings folder, another table) is one line here, not a traceback from a worker.
    """
    schema = pq.read_schema(storage.parquet_files(uri)[0])
    expected = {"id": pa.types.is_string, "image": pa.types.is_binary}
    if need_label:
        expected["label"] = pa.types.is_integer
    for name, is_type in expected.items():
        if name not in schema.names or not is_type(schema.field(name).type):
            found = schema.field(name).type if name in schema.names else "missing"
            kind = "a labelled dataset" if need_label else "a dataset"
            needs = "id (string), image (binary)" + (", label (integer)" if need_label else "")
            hint = ""
            if "embedding" in schema.names:
                hint = " (this is an embeddings folder: pass the dataset it was embedded from)"
            message = f"{uri} is not {kind}: column {name!r} is {found}, the contract needs {needs}"
            raise DataError(message + hint)
    return read_classes(uri)


def info(uri: str, sample: int = 200) -> dict:
    """Rows, classes with counts, a sample of image sizes and bytes on disk."""
    files = storage.parquet_files(uri)
    classes = read_classes(uri)
    rows, nbytes, label_counts, sizes = 0, 0, Counter(), Counter()
    for path in files:
        parquet = pq.ParquetFile(path)
        rows += parquet.metadata.num_rows
        nbytes += os.path.getsize(path) if not storage.is_remote(path) else 0
        if "label" in parquet.schema_arrow.names:
            labels = parquet.read(columns=["label"]).column("label").to_numpy(zero_copy_only=False)
            label_counts.update(labels.tolist())
    first = pq.ParquetFile(files[0])
    for batch in first.iter_batches(batch_size=sample, columns=["image"]):
        for data in batch.column("image").to_pylist():
            with Image.open(io.BytesIO(data)) as img:
                sizes[f"{img.size[0]}x{img.size[1]}"] += 1
        break
    per_class = {
        (classes[k] if k < len(classes) else str(k)): int(v) for k, v in sorted(label_counts.items())
    }
    return {
        "uri": storage.normalize(uri),
        "files": len(files),
        "rows": rows,
        "bytes": nbytes,
        "classes": per_class,
        "image_sizes_sample": dict(sizes.most_common(5)),
    }


def read_dataset(uri: str, limit: int | None = None, columns: list[str] | None = None):
    """A lazy Ray Dataset over the Parquet shards of `uri`."""
    import ray.data

    ds = ray.data.read_parquet(storage.parquet_files(uri), columns=columns)
    return ds.limit(limit) if limit else ds


def read_table(uri: str, limit: int | None = None, columns: list[str] | None = None) -> pa.Table:
    """The whole dataset at `uri` as one Arrow table, read in this process (small datasets)."""
    table = pa.concat_tables(pq.read_table(f, columns=columns) for f in storage.parquet_files(uri))
    return table.slice(0, limit) if limit else table


def training_columns(uri: str) -> list[str]:
    """The columns training reads: id, image and label when present, not the metadata columns."""
    names = pq.read_schema(storage.parquet_files(uri)[0]).names
    return [name for name in ("id", "image", "label") if name in names]


def count_rows(uri: str, limit: int | None = None) -> int:
    rows = sum(storage.parquet_rows(f) for f in storage.parquet_files(uri))
    return min(rows, limit) if limit else rows


def labels_in_first(uri: str, limit: int) -> set[int]:
    """The distinct labels of the first `limit` rows: the ones data.limit keeps."""
    seen, left = set(), limit
    for f in storage.parquet_files(uri):
        labels = pq.read_table(f, columns=["label"]).column("label").to_numpy()[:left]
        seen.update(int(v) for v in np.unique(labels))
        left -= len(labels)
        if left <= 0:
            break
    return seen


def class_repeats(uri: str, limit: int | None = None) -> dict[int, float]:
    """data.balance: how often each row of a class is drawn per epoch so that every class is
    drawn equally often and the epoch keeps its size: (rows / classes) / rows of the class."""
    labels = np.concatenate(
        [pq.read_table(f, columns=["label"]).column("label").to_numpy() for f in storage.parquet_files(uri)]
    )
    values, counts = np.unique(labels[:limit] if limit else labels, return_counts=True)
    per_class = counts.sum() / len(counts)
    return {int(v): float(per_class / c) for v, c in zip(values, counts, strict=True)}


def balance_rows(batch: pa.Table, repeats: dict[int, float], seed: int) -> pa.Table:
    """For Ray Data map_batches: each row `repeats[label]` times on average.

    Ray Data has no weighted sampler, so this one is ours: rows of rare classes repeat,
    rows of common ones are kept with probability < 1. The fraction is decided by a hash
    of the row's id and `seed`, so every epoch (and a resumed run) draws the same rows.
    """
    factor = np.array([repeats[label] for label in batch.column("label").to_pylist()])
    whole = np.floor(factor)
    draw = np.array([zlib.crc32(str(i).encode(), seed) for i in batch.column("id").to_pylist()]) / 2**32
    times = whole.astype(np.int64) + (draw < factor - whole)
    return batch.take(np.repeat(np.arange(batch.num_rows), times))


# -- bundled quickstart data ------------------------------------------------------------


def digits_dataset(out: str, test_share: float = 0.2, seed: int = 0) -> tuple[str, str]:
    """scikit-learn's digits (1,797 real 8x8 handwritten digits) as canonical Parquet.

    Returns (train_uri, test_uri); written once, reused on later calls.
    """
    train_uri, test_uri = storage.join(out, "train"), storage.join(out, "test")
    if storage.exists(train_uri) and storage.exists(test_uri):
        return train_uri, test_uri
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_test = int(len(order) * test_share)
    classes = [str(c) for c in digits.target_names]
    for uri, idx in ((test_uri, order[:n_test]), (train_uri, order[n_test:])):
        ids, images, labels = [], [], []
        for i in sorted(idx):
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            ids.append(f"digits/{i:04d}")
            images.append(buf.getvalue())
            labels.append(int(digits.target[i]))
        schema = dataset_schema(True, classes, {"source": "sklearn.datasets.load_digits"})
        with storage.publish_dir(uri, overwrite=True) as staging:
            table = pa.table({"id": ids, "image": images, "label": labels}, schema=schema)
            pq.write_table(table, staging / "part-00000.parquet")
    return train_uri, test_uri
