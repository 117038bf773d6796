"""The dataset contract: ingest from image folders and Parquet, and the readers.

Real files and real images made with PIL in tmp_path; real CIFAR-10 when ../shared is present.

    .venv/bin/python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from system.data.dataset import (
    DataError,
    class_repeats,
    count_rows,
    decode_image,
    digits_dataset,
    info,
    ingest,
    read_classes,
)
from system.storage import StorageError, parquet_files

CLASSES = ["cat", "dog", "frog"]


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (16, 12)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def read_table(uri: str | Path) -> pa.Table:
    files = sorted(Path(uri).glob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def rejected_lines(uri: str | Path) -> list[dict]:
    text = (Path(uri) / "_rejected.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, dict[str, tuple[bytes, int]]]:
    """3 classes x 4 images (PNG and JPEG mixed); returns the root and {id: (bytes, label)}."""
    root = tmp_path / "imagefolder"
    expected = {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(4):
            fmt, suffix = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            data = image_bytes(label * 10 + i, fmt)
            (root / name / f"{i}.{suffix}").write_bytes(data)
            expected[f"{name}/{i}.{suffix}"] = (data, label)
    return root, expected


def write_parquet(path: Path, columns: dict, classes: list[str] | None = None) -> Path:
    table = pa.table(columns)
    if classes is not None:
        table = table.replace_schema_metadata({"classes": ",".join(classes)})
    pq.write_table(table, path)
    return path


# -- image folders --------------------------------------------------------------------------------


def test_ingest_imagefolder_labels_classes_shards_and_bytes(image_folder, tmp_path):
    root, expected = image_folder
    out = tmp_path / "out"
    summary = ingest(str(root), str(out), shard_rows=4, progress=False)

    assert summary["rows"] == 12 and summary["rejected"] == 0
    assert summary["shards"] == 3 and summary["classes"] == CLASSES
    assert len(list(out.glob("part-*.parquet"))) == 3
    assert count_rows(str(out)) == 12 and count_rows(str(out), limit=5) == 5
    assert read_classes(str(out)) == CLASSES
    assert (out / "_rejected.jsonl").read_text() == ""

    table = read_table(out)
    assert table.schema.field("label").type == pa.int16()
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids) == 12
    assert set(ids) == set(expected)
    for row_id, data, label in zip(
        ids, table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True
    ):
        assert data == expected[row_id][0]  # the encoded bytes, unchanged
        assert label == expected[row_id][1]
        assert CLASSES[label] == row_id.split("/")[0]


def test_ingest_imagefolder_ignores_hidden_files_and_loose_non_images(image_folder, tmp_path):
    root, expected = image_folder
    (root / "README.txt").write_text("not an image, and not a class")
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    (root / "cat" / ".ipynb_checkpoints" / "0.png").write_bytes(image_bytes(99))
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x01")

    out = tmp_path / "out"
    summary = ingest(str(root), str(out), progress=False)

    assert summary["classes"] == CLASSES  # still an ImageFolder despite README.txt
    assert summary["rows"] == 12 and summary["rejected"] == 0
    assert set(read_table(out).column("id").to_pylist()) == set(expected)


def test_ingest_flat_folder_has_no_label_and_no_classes(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    images = {f"img{i}.png": image_bytes(i) for i in range(5)}
    for name, data in images.items():
        (root / name).write_bytes(data)

    out = tmp_path / "out"
    summary = ingest(str(root), str(out), progress=False)

    assert summary["rows"] == 5 and summary["classes"] == []
    table = read_table(out)
    assert table.column_names == ["id", "image"]
    assert dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True)) == images
    assert read_classes(str(out)) == []
    assert info(str(out))["classes"] == {}


def test_ingest_skips_corrupt_files_and_lists_them(image_folder, tmp_path):
    root, expected = image_folder
    jpeg = image_bytes(123, "JPEG", size=(64, 64))
    (root / "cat" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog" / "text.png").write_text("this is not a PNG")
    (root / "frog" / "empty.jpg").write_bytes(b"")

    out = tmp_path / "out"
    summary = ingest(str(root), str(out), progress=False)

    assert summary["rows"] == 12 and summary["rejected"] == 3
    assert set(read_table(out).column("id").to_pylist()) == set(expected)
    reasons = {line["id"]: line["reason"] for line in rejected_lines(out)}
    assert set(reasons) == {"cat/truncated.jpg", "dog/text.png", "frog/empty.jpg"}
    assert reasons["frog/empty.jpg"] == "empty file"
    assert reasons["cat/truncated.jpg"].startswith("not a readable image")
    assert reasons["dog/text.png"].startswith("not a readable image")


def test_ingest_only_unreadable_files_is_an_error_that_says_why(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.png").write_text("nope")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"no readable images.*1 rejected.*a\.png: not a readable image"):
        ingest(str(root), str(out), progress=False)
    assert not out.exists()


# -- Parquet sources ------------------------------------------------------------------------------


def test_ingest_real_cifar10_keeps_rows_labels_and_classes(cifar10_dir, tmp_path):
    src = cifar10_dir / "test.parquet"
    out = tmp_path / "cifar10-test"
    summary = ingest(str(src), str(out), shard_rows=5000, progress=False)

    source = pq.read_table(src, columns=["id", "label"])
    source_classes = source.schema.metadata[b"classes"].decode().split(",")
    assert summary["rows"] == source.num_rows == 10_000
    assert summary["rejected"] == 0 and summary["shards"] == 2
    assert read_classes(str(out)) == source_classes == summary["classes"]

    table = pq.read_table(out, columns=["id", "label"])
    assert table.column("id").to_pylist() == source.column("id").to_pylist()
    assert Counter(table.column("label").to_pylist()) == Counter(source.column("label").to_pylist())

    stats = info(str(out))
    assert stats["rows"] == 10_000 and stats["files"] == 2
    assert stats["classes"] == {name: 1000 for name in source_classes}
    assert stats["image_sizes_sample"] == {"32x32": 200}


def test_ingest_parquet_with_other_column_names(tmp_path):
    images = [image_bytes(i) for i in range(6)]
    src = write_parquet(
        tmp_path / "src.parquet",
        {
            "key": [f"k{i}" for i in range(6)],
            "img": images,
            "y": pa.array([0, 1, 2, 0, 1, 2], pa.int64()),
            "note": ["x"] * 6,
        },
        classes=CLASSES,
    )
    out = tmp_path / "out"
    summary = ingest(str(src), str(out), image_col="img", label_col="y", id_col="key", progress=False)

    assert summary["rows"] == 6 and summary["classes"] == CLASSES
    table = read_table(out)
    assert table.column_names == ["id", "image", "label", "note"]  # other columns stay, as metadata
    assert table.column("note").to_pylist() == ["x"] * 6
    assert table.column("id").to_pylist() == [f"k{i}" for i in range(6)]
    assert table.column("image").to_pylist() == images
    assert table.column("label").to_pylist() == [0, 1, 2, 0, 1, 2]
    assert read_classes(str(out)) == CLASSES


def test_ingest_parquet_huggingface_image_struct(tmp_path):
    images = [image_bytes(i) for i in range(3)]
    structs = [{"bytes": data, "path": f"{i}.png"} for i, data in enumerate(images)]
    src = write_parquet(tmp_path / "hf.parquet", {"img": structs, "label": [1, 0, 1]})
    # What `datasets` writes: the ClassLabel's names in the schema's "huggingface" metadata.
    features = {"img": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["cat", "dog"]}}
    hf_meta = json.dumps({"info": {"features": features}})
    pq.write_table(pq.read_table(src).replace_schema_metadata({"huggingface": hf_meta}), src)
    out = tmp_path / "out"
    summary = ingest(str(src), str(out), image_col="img", progress=False)

    assert summary["rows"] == 3  # label picked up by its default name
    assert summary["classes"] == read_classes(str(out)) == ["cat", "dog"]
    table = read_table(out)
    assert table.column("image").to_pylist() == images
    assert table.column("label").to_pylist() == [1, 0, 1]
    assert len(set(table.column("id").to_pylist())) == 3  # positional ids when there is no id column


def test_ingest_names_unnamed_labels_by_number(tmp_path):
    images = [image_bytes(i) for i in range(3)]
    src = write_parquet(tmp_path / "src.parquet", {"image": images, "label": [0, 2, 2]})
    summary = ingest(str(src), str(tmp_path / "out"), progress=False)
    assert summary["classes"] == read_classes(str(tmp_path / "out")) == ["0", "1", "2"]


def test_ingest_stores_other_formats_as_png(tmp_path):
    """The contract's images are JPEG, PNG or WebP: a BMP or GIF is re-encoded losslessly as PNG."""
    (tmp_path / "src").mkdir()
    for i, fmt in enumerate(["BMP", "GIF", "JPEG"]):
        (tmp_path / "src" / f"{i}.{fmt.lower()}").write_bytes(image_bytes(i, fmt))
    ingest(str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    stored = read_table(tmp_path / "out").column("image").to_pylist()
    formats = [Image.open(io.BytesIO(data)).format for data in stored]
    assert formats == ["PNG", "PNG", "JPEG"]
    assert stored[2] == image_bytes(2, "JPEG")  # a JPEG is kept byte for byte
    for i, fmt in enumerate(["BMP", "GIF"]):
        original = np.asarray(Image.open(io.BytesIO(image_bytes(i, fmt))).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored[i])).convert("RGB")), original)


def test_ingest_refuses_a_class_name_with_a_comma(image_folder, tmp_path):
    root, _ = image_folder
    (root / CLASSES[0]).rename(root / "New York, NY")
    with pytest.raises(DataError, match="'New York, NY' holds a comma"):
        ingest(str(root), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_ingest_duplicate_id_fails_and_leaves_nothing(tmp_path):
    src = write_parquet(
        tmp_path / "dup.parquet",
        {"id": ["a", "b", "dup-7", "c", "dup-7"], "image": [image_bytes(i) for i in range(5)]},
    )
    out_parent = tmp_path / "outputs"
    out = out_parent / "ds"
    with pytest.raises(DataError, match="duplicate id 'dup-7'"):
        ingest(str(src), str(out), shard_rows=2, progress=False)  # shards were written before the dup
    assert not out.exists()
    assert list(out_parent.iterdir()) == []  # no staging folder left beside it either


def test_ingest_existing_output_needs_overwrite(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "out"
    ingest(str(root), str(out), shard_rows=1, progress=False)
    assert len(list(out.glob("part-*.parquet"))) == 12

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "only.png").write_bytes(image_bytes(7))
    with pytest.raises(StorageError, match="output exists"):
        ingest(str(flat), str(out), progress=False)
    assert count_rows(str(out)) == 12  # untouched

    ingest(str(flat), str(out), overwrite=True, progress=False)
    assert [p.name for p in out.glob("part-*.parquet")] == ["part-00000.parquet"]  # old shards gone
    assert count_rows(str(out)) == 1 and read_classes(str(out)) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ingest_missing_source_and_bad_columns(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no such source"):
        ingest(str(tmp_path / "nowhere"), str(out), progress=False)
    with pytest.raises(DataError, match="no such source"):
        ingest(str(tmp_path / "nowhere.parquet"), str(out), progress=False)

    src = write_parquet(tmp_path / "src.parquet", {"image": [image_bytes(0)], "name": ["cat"]})
    with pytest.raises(DataError, match="'pixels'"):
        ingest(str(src), str(out), image_col="pixels", progress=False)
    with pytest.raises(DataError, match="'nolabel'"):
        ingest(str(src), str(out), label_col="nolabel", progress=False)
    with pytest.raises(DataError, match="'name'.*integer"):
        ingest(str(src), str(out), label_col="name", progress=False)
    with pytest.raises(DataError, match="shard-rows"):
        ingest(str(src), str(out), shard_rows=0, progress=False)
    assert not out.exists()


# -- readers ----------------------------------------------------------------------------------------


def test_info_reports_rows_classes_sizes_and_bytes(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "out"
    ingest(str(root), str(out), shard_rows=5, progress=False)

    stats = info(str(out))
    assert stats["uri"] == str(out.resolve())
    assert stats["rows"] == 12 and stats["files"] == 3
    assert stats["classes"] == {name: 4 for name in CLASSES}
    assert stats["image_sizes_sample"] == {"16x12": 5}  # the sample is read from the first shard
    assert stats["bytes"] == sum(p.stat().st_size for p in out.glob("part-*.parquet"))


def test_digits_dataset_is_real_split_and_reused(digits_data):
    train_uri, test_uri = digits_data
    assert count_rows(train_uri) + count_rows(test_uri) == 1797
    assert count_rows(test_uri) == int(1797 * 0.2)
    assert read_classes(train_uri) == read_classes(test_uri) == [str(d) for d in range(10)]

    train, test = pq.read_table(train_uri), pq.read_table(test_uri)
    assert set(train.column("label").to_pylist()) == set(range(10))
    assert set(test.column("label").to_pylist()) == set(range(10))
    train_ids, test_ids = set(train.column("id").to_pylist()), set(test.column("id").to_pylist())
    assert len(train_ids) == train.num_rows and len(test_ids) == test.num_rows
    assert not train_ids & test_ids
    image = decode_image(test.column("image")[0].as_py())
    assert image.size == (8, 8) and image.mode == "RGB"

    parts = sorted(Path(train_uri).glob("*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in parts]
    assert digits_dataset(str(Path(train_uri).parent)) == (train_uri, test_uri)
    assert [p.stat().st_mtime_ns for p in parts] == mtimes  # written once, reused


def test_threaded_decoding_equals_one_thread(cifar10_dir):
    """Real CIFAR-10 images through a timm eval transform: 4 threads give the same tensor, in order."""
    from system.data.transforms import eval_transform, images_to_tensor

    images = pq.read_table(cifar10_dir / "test.parquet", columns=["image"]).slice(0, 64)
    images = images.column("image").to_pylist()
    pre = {"size": 48, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "crop_pct": 0.9}
    one = images_to_tensor(images, eval_transform(pre))
    four = images_to_tensor(images, eval_transform(pre), threads=4)
    assert one.shape == (64, 3, 48, 48) and one.std() > 0.1
    np.testing.assert_array_equal(four, one)


def test_training_input_is_reproducible_on_the_seed(ray_local, digits_data):
    """Same seed: the same shuffled order and SSL views each epoch, in every run; new ones each epoch."""
    import ray.data

    from system.config import build_config
    from system.train import input_datasets

    def run(seed: int, epochs: int = 2) -> list[tuple[list, np.ndarray]]:
        data = {"train": digits_data[0], "limit": 256}
        cfg = build_config(
            {"data": data, "objective": {"name": "simclr"}, "train": {"batch_size": 32}, "seed": seed}
        )
        pre = {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}
        train = input_datasets(cfg, "pretrain", pre)["train"]
        epoch_data = []
        for _ in range(epochs):  # each pass is one execution, as each epoch of a run is
            batches = list(train.iter_batches(batch_size=None))
            views = np.concatenate([b["view1"] for b in batches])
            epoch_data.append((np.concatenate([b["label"] for b in batches]).tolist(), views))
        return epoch_data

    context = ray.data.DataContext.get_current()
    kept, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        first, again, other = run(3), run(3), run(4, epochs=1)
    finally:
        context.execution_options.preserve_order = kept
    for (labels, views), (labels_again, views_again) in zip(first, again, strict=True):
        assert labels == labels_again
        np.testing.assert_array_equal(views, views_again)
    assert first[0][0] != first[1][0]  # a new order in the second epoch
    assert sorted(first[0][0]) == sorted(first[1][0])  # of the same rows
    assert first[0][0] != other[0][0] and not np.array_equal(first[0][1], other[0][1])


def test_small_training_input_is_held_in_the_object_store(ray_local, digits_data):
    """Under data.cache_mb the rows are read once into the object store; the same rows as a lazy read."""
    from ray.data.dataset import MaterializedDataset

    from system.train import cached_input

    cached = cached_input(digits_data[0], 300, cache_mb=1024)
    lazy = cached_input(digits_data[0], 300, cache_mb=0)
    assert isinstance(cached, MaterializedDataset)
    assert not isinstance(lazy, MaterializedDataset)
    rows = lambda ds: [(r["id"], r["label"], r["image"]) for r in ds.take_all()]  # noqa: E731
    assert rows(cached) == rows(lazy) and len(rows(cached)) == 300


def test_class_balanced_sampling_draws_every_class_equally(ray_local, digits_data, tmp_path):
    """data.balance on a 10:1 two-class set: about half of each class per epoch, same size, same rows."""
    from system.config import build_config
    from system.train import input_datasets

    table = pa.concat_tables(pq.read_table(f) for f in parquet_files(digits_data[0]))
    labels = table.column("label").to_numpy()
    picks = np.concatenate([np.flatnonzero(labels == 0)[:140], np.flatnonzero(labels == 1)[:14]])
    (tmp_path / "skewed").mkdir()
    pq.write_table(table.take(picks), tmp_path / "skewed" / "part-00000.parquet")

    repeats = class_repeats(str(tmp_path / "skewed"))
    assert repeats == pytest.approx({0: 77 / 140, 1: 77 / 14})
    cfg = build_config({"data": {"train": str(tmp_path / "skewed"), "balance": True, "shuffle": "none"}})
    pre = {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}
    train = input_datasets(cfg, "finetune", pre)["train"]
    epochs = [
        Counter(np.concatenate([b["label"] for b in train.iter_batches(batch_size=None)])) for _ in "ab"
    ]
    assert epochs[0] == epochs[1]  # the same draw every epoch
    assert 0.85 * 154 <= sum(epochs[0].values()) <= 1.15 * 154  # the epoch keeps its size
    assert 0.4 <= epochs[0][1] / sum(epochs[0].values()) <= 0.6, epochs[0]  # was 14 of 154
