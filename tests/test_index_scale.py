"""Index recipes, sharding, tuning, on-disk lists and Matryoshka prefix search, with real FAISS.

Vectors: scikit-learn's digits (real, clustered, with near-duplicates) and, when
../shared is present, CIFAR-10 images pooled to 8x8 RGB (192 dims). Every recall is
measured against exact search in the same test.
"""

from __future__ import annotations

import io
import json
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from system.embed.batch import embeddings_table
from system.index import IndexInputError, VectorIndex, build_index, evaluate_index, open_index
from system.index import build as index_build
from system.index.build import _prefix_dim
from system.index.recipes import choose_factory, new_index, shard_of


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write(folder, ids, vectors, files: int = 2, **meta) -> str:
    folder.mkdir(parents=True)
    metadata = {"fingerprint": "fp", "normalized": "true", "dim": str(vectors.shape[1]), **meta}
    for n, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        table = embeddings_table([ids[i] for i in part], vectors[part], None, metadata)
        pq.write_table(table, folder / f"part-{n:05d}.parquet")
    return str(folder)


@pytest.fixture(scope="module")
def digits():
    vectors = load_digits().data.astype(np.float32)
    return [f"d{i:04d}" for i in range(len(vectors))], _unit(vectors)


@pytest.fixture(scope="module")
def digits_uri(tmp_path_factory, digits) -> str:
    return _write(tmp_path_factory.mktemp("emb") / "digits", *digits)


def _exact(vectors, queries, k):
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def _recall(found: list[list[str]], truth: np.ndarray, ids: list[str], k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & {ids[t] for t in row}) / k for f, row in zip(found, truth)]))


@pytest.fixture(scope="module")
def sharded(ray_local, digits_uri, tmp_path_factory):
    """A 3-shard exact index of the digits, built once: (manifest, folder). Tests copy it to change it."""
    folder = tmp_path_factory.mktemp("sharded") / "three"
    return build_index(digits_uri, str(folder), "Flat", shards=3, progress=False), folder


def test_sharded_exact_equals_unsharded(digits, digits_uri, sharded, tmp_path):
    ids, vectors = digits
    # One shard, in-process, reads the embeddings twice: a sample pass and the add pass.
    assert build_index(digits_uri, str(tmp_path / "one"), "Flat", progress=False)["rows_read"] == 2 * len(ids)
    one = open_index(str(tmp_path / "one"))
    manifest = sharded[0]
    shutil.copytree(sharded[1], tmp_path / "three")
    three = open_index(str(tmp_path / "three"))
    assert manifest["shards"] == 3 and manifest["count"] == len(ids) == len(three)
    sizes = [s.ntotal for s in three.shards]
    assert sizes == np.bincount(shard_of(ids, 3), minlength=3).tolist() and min(sizes) > 400

    queries = 0.7 * vectors[:60] + 0.3 * vectors[-60:]
    (f1, s1), (f3, s3) = one.search(queries, 10), three.search(queries, 10)
    np.testing.assert_allclose(s3, s1, rtol=1e-6, atol=1e-6)
    assert f3 == f1 or all(  # same ids, except where two scores tie to float precision
        a == b or np.isclose(x, y, atol=1e-6).all() for a, b, x, y in zip(f1, f3, s1, s3)
    )
    # Updates route by id hash too, and survive save + reopen like the unsharded index.
    new = _unit(vectors[:2] + vectors[2:4])
    for ix in (one, three):
        ix.add(["n1", "n2"], new)
        ix.remove(["d0005", "n2"])
    three.save()
    reopened = open_index(str(tmp_path / "three"))
    assert len(reopened) == len(one) == len(ids) and reopened.search(new[:1], 1)[0] == [["n1"]]
    np.testing.assert_allclose(
        reopened.search(queries, 10)[1], one.search(queries, 10)[1], rtol=1e-6, atol=1e-6
    )
    assert "d0005" not in {i for row in reopened.search(vectors[5:6], 20)[0] for i in row}
    saved = [pq.read_table(tmp_path / "three" / name) for name in reopened.info()["id_files"]]
    assert [shard_of(t.column("id").to_pylist(), 3).tolist() for t in saved] == [
        [s] * len(t) for s, t in enumerate(saved)
    ]
    assert "n1" in saved[shard_of(["n1"], 3)[0]].column("id").to_pylist()


def test_sharded_build_reads_embeddings_once(digits, sharded, tmp_path):
    ids, vectors = digits
    manifest, folder = sharded
    # Streamed once, by the partition tasks (the training sample included); the shard tasks
    # read only their staging files. Before, every shard task streamed the whole dataset.
    assert manifest["rows_read"] == len(ids)
    assert sorted(p.name for p in folder.iterdir()) == [
        "ids-00000.parquet",
        "ids-00001.parquet",
        "ids-00002.parquet",
        "index-00000.faiss",
        "index-00001.faiss",
        "index-00002.faiss",
        "manifest.json",
    ]
    assert [p.name for p in folder.parent.iterdir()] == ["three"]  # no temporary folder left either
    # Each shard task wrote its own id map: its rows, in label order, every row once.
    parts = [pq.read_table(folder / name) for name in manifest["id_files"]]
    for s, part in enumerate(parts):
        assert (shard_of(part.column("id").to_pylist(), 3) == s).all()
        assert (np.diff(part.column("faiss_id").to_numpy()) > 0).all()
    everything = pa.concat_tables(parts).sort_by("faiss_id")
    assert everything.column("id").to_pylist() == ids  # faiss_id is the row's place in the dataset

    # The add phase needs nothing but the staging files: partition, remove the embeddings,
    # then build the shards. The training sample is the unsharded build's sample.
    emb = _write(tmp_path / "emb", ids, vectors, files=3)
    files, counts, schema, _ = index_build.scan(emb)
    expected_sample = index_build.read_sample(files, counts, 500)
    (tmp_path / "staging").mkdir()
    staged, sample, rows = index_build.run_partition(
        files, len(ids), 500, 2, str(tmp_path / "staging"), schema, False
    )
    assert rows == len(ids) and len(staged) == 2 and all(len(f) == 2 for f in staged)  # 2 readers of 3 files
    np.testing.assert_array_equal(sample, expected_sample)
    shutil.rmtree(emb)
    trained = faiss.serialize_index(new_index(64, "Flat", "ip"))
    args = (str(tmp_path / "staging"), False, vectors[:5], "ip")
    results = [index_build.build_shard(trained, staged[s], None, s, 2, *args) for s in range(2)]
    counts = [r["count"] for r in results]
    assert counts == np.bincount(shard_of(ids, 2)).tolist()
    # Each shard deleted its staging files, keeping its result for a retry of its task.
    assert sorted(p.name for p in (tmp_path / "staging" / ".partition").iterdir()) == [
        "shard-00000.done.npz",
        "shard-00001.done.npz",
    ]
    retried = index_build.build_shard(trained, staged[1], None, 1, 2, *args)  # its files are gone
    assert retried["count"] == counts[1]
    np.testing.assert_array_equal(retried["labels"], results[1]["labels"])
    sizes = [faiss.read_index(str(tmp_path / "staging" / f"index-0000{s}.faiss")).ntotal for s in range(2)]
    assert sizes == counts


def test_sharded_index_with_one_id_map_still_opens(digits, sharded, tmp_path):
    ids, vectors = digits
    # The layout before per-shard id maps: one ids.parquet, no id_files in the manifest.
    old = tmp_path / "old"
    shutil.copytree(sharded[1], old)
    manifest = json.loads((old / "manifest.json").read_text())
    parts = [pq.read_table(old / name) for name in manifest.pop("id_files")]
    pq.write_table(pa.concat_tables(parts).sort_by("faiss_id"), old / "ids.parquet")
    for name in {p.name for p in old.glob("ids-*.parquet")}:
        (old / name).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))

    index, current = open_index(str(old)), open_index(str(sharded[1]))
    queries = 0.7 * vectors[:30] + 0.3 * vectors[-30:]
    (found, scores), (expected, expected_scores) = index.search(queries, 10), current.search(queries, 10)
    assert found == expected
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(index.reconstruct(ids[:50]), current.reconstruct(ids[:50]))
    index.remove(["d0003"])
    index.save()  # written in the per-shard layout
    assert sorted(p.name for p in old.glob("ids*.parquet")) == [f"ids-0000{s}.parquet" for s in range(3)]
    reopened = open_index(str(old))
    assert len(reopened) == len(ids) - 1 and reopened.info()["id_files"] == sharded[0]["id_files"]


class CrashingIndex(VectorIndex):
    def write(self, folder) -> None:
        super().write(folder)
        raise OSError("simulated crash while saving")


def test_crash_during_sharded_save_keeps_previous_index(ray_local, digits, digits_uri, tmp_path):
    ids, vectors = digits
    uri = str(tmp_path / "index")
    build_index(digits_uri, uri, "IVF16,Flat", shards=2, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()}
    crashing = CrashingIndex.load(uri)
    crashing.remove(["d0001", "d0002"])
    with pytest.raises(OSError, match="simulated crash"):
        crashing.save()
    assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    assert len(open_index(uri)) == len(ids)


def test_auto_recipe_follows_size_and_budget():
    g = 2**30
    cases = [  # (count, dim, budget, on_disk) -> expected factory prefix
        ((1_000, 64, g, False), "Flat"),
        ((1_000_000, 128, 16 * g, False), "HNSW32"),
        ((1_000_000, 128, g // 2, False), "IVF4096,Flat"),
        ((20_000_000, 128, 16 * g, False), "IVF16384,Flat"),
        ((20_000_000, 512, 16 * g, False), "IVF16384,PQ64,Refine(SQ8)"),
        ((10**9, 512, 80 * g, False), "OPQ64,IVF131072_HNSW32,PQ64"),
        ((10**9, 512, 32 * g, True), "OPQ64,IVF131072_HNSW32,PQ64"),
    ]
    for (count, dim, budget, on_disk), expected in cases:
        factory, reason, ram = choose_factory("auto", count, dim, budget, on_disk)
        assert factory == expected, (count, dim, reason)
        assert 0 < ram <= budget and "budget" in reason
    assert choose_factory("IVF8,Flat", 10**9, 8) == ("IVF8,Flat", "given explicitly", 0)
    with pytest.raises(IndexInputError, match="no index recipe fits .* --shards"):
        choose_factory("auto", 10**9, 512, g)


def test_memory_budget_respected_and_tuned(digits, digits_uri, tmp_path):
    ids, vectors = digits
    budget = 300 * 1024  # below Flat and HNSW for 1,797 x 64 float32
    auto = build_index(
        digits_uri, str(tmp_path / "auto"), memory_budget="300K", progress=False, tune_seconds=20
    )
    assert auto["factory"].startswith("IVF") and "measured" in auto["reason"], auto["reason"]
    assert auto["estimated_ram_bytes"] <= budget and auto["memory_budget"] == budget
    report = evaluate_index(str(tmp_path / "auto"), num_queries=200)
    assert report["bytes_per_vector"] * len(ids) <= budget  # the real file, not just the estimate
    assert report["recall@10"] >= 0.9, report  # tuned for 0.95 on other queries

    manifest = build_index(digits_uri, str(tmp_path / "ix"), "IVF32,PQ16,Refine(SQ8)", progress=False)

    points = manifest["operating_points"]
    assert [p["qps"] for p in points] == sorted((p["qps"] for p in points), reverse=True)
    assert [p["recall@10"] for p in points] == sorted(p["recall@10"] for p in points)  # Pareto front
    assert points[0]["recall@10"] < 0.95 <= manifest["target_recall"] <= max(p["recall@10"] for p in points)
    chosen = next(p for p in points if p["params"] == manifest["search_params"])
    assert chosen["recall@10"] >= 0.95 and all(
        p["qps"] <= chosen["qps"] for p in points if p["recall@10"] >= 0.95
    )
    tuned = evaluate_index(str(tmp_path / "ix"), num_queries=200)
    fast = evaluate_index(str(tmp_path / "ix"), num_queries=200, target_recall=0.5)
    assert fast["search_params"] == points[0]["params"] and fast["recall@10"] < tuned["recall@10"]


@pytest.fixture(scope="module")
def cifar_uri(cifar10_dir, tmp_path_factory) -> str:
    """3,000 real CIFAR-10 test images as 8x8 RGB averages (192 dims), centred, L2-normalised."""
    images = pq.read_table(cifar10_dir / "test.parquet", columns=["image"]).column("image").to_pylist()[:3000]
    pixels = np.stack(
        [np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((8, 8), Image.BOX)) for b in images]
    )
    vectors = pixels.reshape(len(pixels), -1).astype(np.float32)
    vectors = _unit(vectors - vectors.mean(axis=0))
    return _write(tmp_path_factory.mktemp("cifar") / "emb", [f"c{i}" for i in range(len(vectors))], vectors)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF64,Flat", "IVF64,PQ24x4fs,Refine(SQ8)", "IVF64,SQ8"])
def test_recipe_recall_on_cifar(cifar_uri, tmp_path, factory):
    manifest = build_index(cifar_uri, str(tmp_path / "ix"), factory, progress=False)
    chosen = next(p for p in manifest["operating_points"] if p["params"] == manifest["search_params"])
    report = evaluate_index(str(tmp_path / "ix"), num_queries=200)
    # Tuned to 0.95 on held-out mixes; these queries are stored vectors, a different set.
    # SQ8 alone caps recall (no re-rank), so its bar is the tuned point it reached.
    floor = 0.9 if chosen["recall@10"] >= 0.95 else chosen["recall@10"] - 0.05
    assert report["recall@10"] >= floor and report["recall@1"] >= floor, (manifest["search_params"], report)
    assert factory != "IVF64,Flat" or manifest["search_params"]["nprobe"] < 64  # tuning chose a cheaper point


def test_matryoshka_prefix_rerank_beats_prefix_only(digits, tmp_path):
    ids, vectors = digits
    # PCA-rotated digits: variance falls along the dims, as in Matryoshka embeddings.
    centred = vectors - vectors.mean(axis=0)
    rotated = _unit(centred @ np.linalg.svd(centred, full_matrices=False)[2].T)
    full = _write(tmp_path / "full", ids, rotated, matryoshka_dims="8,16,32")
    short = _write(tmp_path / "short", ids, _unit(rotated[:, :8]))
    queries = _unit(0.7 * rotated[:200] + 0.3 * rotated[-200:])
    truth = _exact(rotated, queries, 10)

    build_index(short, str(tmp_path / "ix_short"), "Flat", progress=False)
    prefix_only = _recall(
        open_index(str(tmp_path / "ix_short")).search(_unit(queries[:, :8]), 10)[0], truth, ids
    )
    manifest = build_index(full, str(tmp_path / "ix_prefix"), "Flat", prefix_dim=8, progress=False)
    assert manifest["prefix_dim"] == 8 and manifest["matryoshka_dims"] == [8, 16, 32]
    reranked = _recall(open_index(str(tmp_path / "ix_prefix")).search(queries, 10)[0], truth, ids)
    assert reranked >= prefix_only + 0.1 and reranked >= 0.9, (prefix_only, reranked)

    assert _prefix_dim(None, {"matryoshka_dims": "8,16,32"}, 64, "HNSW32", True) == 16  # >= dim/4
    assert _prefix_dim(None, {"matryoshka_dims": "8,16,32"}, 64, "Flat", True) == 0
    assert _prefix_dim(None, {"matryoshka_dims": ""}, 64, "HNSW32", True) == 0
    with pytest.raises(IndexInputError, match="prefix-dim 64"):
        _prefix_dim(64, {}, 64, "Flat", True)


def test_training_sample_grows_with_the_coarse_lists():
    # 40 points per k-means centroid: IVF16384 over 10M vectors trains on 655,360 of them.
    assert index_build.train_sample_size(new_index(64, "IVF16384,PQ16", "ip"), 10_000_000) == 655_360
    assert index_build.train_sample_size(new_index(64, "IVF256,Flat", "ip"), 10_000_000) == 100_000
    assert index_build.train_sample_size(new_index(64, "HNSW32", "ip"), 5_000) == 5_000


def test_on_disk_lists_match_in_memory(digits, digits_uri, tmp_path, monkeypatch):
    ids, vectors = digits
    monkeypatch.setattr(index_build, "ONDISK_BLOCK", 500)  # several blocks to merge, on a small set
    build_index(digits_uri, str(tmp_path / "ram"), "IVF32,Flat", progress=False)
    manifest = build_index(digits_uri, str(tmp_path / "disk"), "IVF32,Flat", on_disk=True, progress=False)
    assert manifest["on_disk"] and sorted(p.name for p in (tmp_path / "disk").iterdir()) == [
        "ids.parquet",
        "index.faiss",
        "index.ivfdata",
        "manifest.json",
    ]
    shutil.move(tmp_path / "disk", tmp_path / "moved")  # lists are found beside the index file
    ram, disk = open_index(str(tmp_path / "ram")), open_index(str(tmp_path / "moved"))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(disk.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    queries = 0.7 * vectors[:50] + 0.3 * vectors[-50:]
    for index in (ram, disk):
        faiss.extract_index_ivf(index.index).nprobe = 4
    (fr, sr), (fd, sd) = ram.search(queries, 10), disk.search(queries, 10)
    np.testing.assert_allclose(sd, sr, rtol=1e-6)
    assert fd == fr
    np.testing.assert_allclose(disk.reconstruct(["d0042"]), vectors[42:43], atol=1e-6)
    with pytest.raises(IndexInputError, match="on-disk index is read-only"):
        disk.add(["x"], vectors[:1])
    assert len(disk) == len(ids)
    with pytest.raises(IndexInputError, match="needs an IVF index"):
        build_index(digits_uri, str(tmp_path / "bad"), "HNSW32", on_disk=True, progress=False)


def test_bad_build_options(digits_uri, tmp_path):
    # The CLI turns these ValueErrors into one `repforge: error:` line, exit 2 (tests/test_cli.py).
    with pytest.raises(IndexInputError, match="memory budget 'lots': use a size such as 512M"):
        build_index(digits_uri, str(tmp_path / "a"), memory_budget="lots")
    with pytest.raises(IndexInputError, match="shards must be a positive integer"):
        build_index(digits_uri, str(tmp_path / "a"), shards=0)
    with pytest.raises(IndexInputError, match="target recall"):
        build_index(digits_uri, str(tmp_path / "a"), target_recall=1.5)
    assert list(tmp_path.iterdir()) == []


def test_large_sharded_build_tunes_on_one_shard(ray_local, digits, digits_uri, tmp_path, monkeypatch):
    """Above TUNE_WHOLE_INDEX_BYTES the sweep loads shard 0 alone; its parameters serve the whole index."""
    ids, vectors = digits
    monkeypatch.setattr(index_build, "TUNE_WHOLE_INDEX_BYTES", 0)  # as if the index were huge
    manifest = build_index(digits_uri, str(tmp_path / "ivf"), "IVF16,Flat", shards=3, progress=False)
    assert manifest["tuned_on"] == "shard 0 of 3" and manifest["operating_points"]
    nprobe = manifest["search_params"]["nprobe"]
    assert 1 <= nprobe < 16  # a real choice: fewer lists than all of them
    queries = vectors[::20]
    found, _ = open_index(str(tmp_path / "ivf")).search(queries, 10)  # with the chosen nprobe
    assert _recall(found, _exact(vectors, queries, 10), ids) >= 0.9
