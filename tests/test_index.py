"""system.index.api on real data: scikit-learn's digits (1,797 images of 8x8 pixels) as vectors.

The pixels, L2-normalised, stand in for embeddings: real, clustered, with near-duplicates,
which is what makes ties and approximate search show up. Everything runs real FAISS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from system import storage
from system.embed.batch import embeddings_table
from system.index import (
    IndexInputError,
    VectorIndex,
    build_index,
    check_fingerprint,
    evaluate_index,
    open_index,
)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    vectors = data.data.astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"d{i:04d}" for i in range(len(vectors))]
    return ids, vectors, data.target.astype(np.int64)


@pytest.fixture(scope="module")
def embeddings_uri(tmp_path_factory, digits) -> str:
    """The embeddings contract, in two Parquet shards like an embed job writes."""
    ids, vectors, labels = digits
    folder = tmp_path_factory.mktemp("emb")
    meta = {
        "fingerprint": "digits-pixels",
        "normalized": "true",
        "dim": "64",
        "timm_name": "",
        "classes": ",".join(map(str, range(10))),
    }
    half = len(ids) // 2
    for shard, part in enumerate((slice(0, half), slice(half, None))):
        table = embeddings_table(ids[part], vectors[part], {"label": pa.array(labels[part])}, meta)
        pq.write_table(table, folder / f"part-{shard:05d}.parquet")
    return str(folder)


def _build(embeddings_uri, tmp_path, factory="auto", metric=None, shards=1) -> str:
    out = str(tmp_path / "index")
    build_index(embeddings_uri, out, factory=factory, metric=metric, shards=shards, progress=False)
    return out


def _brute_force(vectors, queries, metric, k):
    if metric == "ip":
        scores = queries @ vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return scores, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("metric", [None, "l2"])
def test_exact_index_matches_brute_force(embeddings_uri, digits, tmp_path, metric):
    ids, vectors, _ = digits
    manifest = build_index(embeddings_uri, str(tmp_path / "index"), metric=metric, progress=False)
    expected_metric = metric or "ip"  # the embeddings say normalized
    assert manifest["factory"] == "Flat" and manifest["metric"] == expected_metric
    assert manifest["count"] == len(ids) and manifest["dim"] == 64 and manifest["shards"] == 1
    assert manifest["fingerprint"] == "digits-pixels" and manifest["classes"] == list("0123456789")
    on_disk = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert on_disk == manifest

    index = open_index(str(tmp_path / "index"))
    assert len(index) == len(ids) and index.metric == expected_metric
    # Queries that are not stored vectors: uneven mixes of two digits, so nothing is a trivial hit.
    queries = 0.7 * vectors[:40] + 0.3 * vectors[-40:]
    found, scores = index.search(queries, 10)
    all_scores, best = _brute_force(vectors, queries, expected_metric, 10)
    # Compared by score: near-duplicate digits tie, and either tied id is a correct answer.
    np.testing.assert_allclose(scores, best, rtol=1e-4, atol=1e-5)
    row = {id_: i for i, id_ in enumerate(ids)}
    for q, (hit_ids, hit_scores) in enumerate(zip(found, scores, strict=True)):
        assert len(set(hit_ids)) == 10
        true = all_scores[q, [row[i] for i in hit_ids]]
        np.testing.assert_allclose(hit_scores, true, rtol=1e-4, atol=1e-5)
    # Where the top hit is unambiguous, the id itself must match.
    ranked = np.sort(-all_scores if expected_metric == "ip" else all_scores, axis=1)
    order = np.argsort(-all_scores if expected_metric == "ip" else all_scores, axis=1)
    clear = [q for q in range(len(queries)) if ranked[q, 1] - ranked[q, 0] > 1e-4]
    assert len(clear) > 30 and all(found[q][0] == ids[order[q, 0]] for q in clear)


def test_search_by_id_and_large_k(embeddings_uri, digits, tmp_path):
    ids, vectors, _ = digits
    index = open_index(_build(embeddings_uri, tmp_path / "flat"))
    found, scores = index.search_by_id(["d0007", "d1000"], 3)
    # A stored unit vector is its own best match (score 1), unless an exact duplicate ties it.
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert "d0007" in found[0] and "d1000" in found[1]
    found, scores = index.search(vectors[:2], 5000)  # k larger than the index: every id once
    assert scores.shape == (2, len(ids)) and all(sorted(f) == sorted(ids) for f in found)

    # IVF probing 1 list of 16 finds fewer than k: the id lists are shorter, scores padded.
    ivf = open_index(_build(embeddings_uri, tmp_path / "ivf", factory="IVF16,Flat"))
    found, scores = ivf.search(vectors[:1], len(ids))
    assert scores.shape == (1, len(ids)) and 0 < len(found[0]) < len(ids)
    assert found[0][0] == "d0000" and len(set(found[0])) == len(found[0])


def test_evaluate_exact_and_approximate(embeddings_uri, tmp_path):
    exact = evaluate_index(_build(embeddings_uri, tmp_path / "flat"), num_queries=100)
    assert exact["recall@1"] == exact["recall@10"] == exact["recall@100"] == 1.0
    assert exact["count"] == 1797 and exact["num_queries"] == 100
    assert exact["qps_batch1"] > 0 and exact["qps_batch256"] > 0
    assert 0 < exact["latency_ms_p50"] <= exact["latency_ms_p99"]
    assert 64 * 4 <= exact["bytes_per_vector"] < 64 * 4 + 64  # float32 vectors + an int64 id each
    assert exact["build_seconds"] >= 0
    json.dumps(exact)

    # IVF with one probe out of 16 lists misses neighbours across list borders: good, not exact.
    ivf = evaluate_index(_build(embeddings_uri, tmp_path / "ivf", factory="IVF16,Flat"), num_queries=100)
    assert ivf["factory"] == "IVF16,Flat"
    assert 0.5 < ivf["recall@10"] < 1.0, ivf
    assert ivf["recall@100"] < ivf["recall@10"] + 0.2

    # Queries passed in are evaluated as given (a broken mapping would give ~0 here).
    queries = np.random.default_rng(0).standard_normal((20, 64)).astype(np.float32)
    given = evaluate_index(str(tmp_path / "flat" / "index"), queries=queries, k=5)
    assert given["num_queries"] == 20 and given["recall@5"] == 1.0


@pytest.mark.parametrize(
    ("factory", "shards"),
    # HNSW and Refine cannot remove in FAISS: their removed vectors stay as tombstones.
    [("Flat", 1), ("IVF16,Flat", 1), ("IVF16,Flat", 3), ("HNSW16", 1), ("IVF16,PQ8,Refine(Flat)", 1)],
)
def test_add_remove_save_reopen(embeddings_uri, digits, tmp_path, factory, shards, request):
    ids, vectors, _ = digits
    if shards > 1:
        request.getfixturevalue("ray_local")  # shard tasks; labels pass through their staging files
    uri = _build(embeddings_uri, tmp_path, factory=factory, shards=shards)
    index = open_index(uri)
    new = np.stack([vectors[0] + vectors[1], vectors[2] + vectors[3]])
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    index.add(["n1", "n2"], new, metadata=[{"label": 42}, None])
    index.remove(["d0005", "d0006", "n2"])
    assert len(index) == len(ids) + 2 - 3

    tombstones = 3 if factory in ("HNSW16", "IVF16,PQ8,Refine(Flat)") else 0

    def check(ix: VectorIndex):
        assert len(ix) == len(ids) - 1 and ix.info()["count"] == len(ids) - 1
        assert ix.info().get("tombstones", 0) == tombstones
        found, _ = ix.search(new[:1], 1)
        assert found == [["n1"]]
        assert ix.metadata(["n1", "d0004"]) == [{"label": 42}, {"label": 4}]
        hits, _ = ix.search(vectors[[5, 6]], 50)
        hits += ix.search(new[1:], 50)[0]
        assert not {"d0005", "d0006", "n2"} & {i for h in hits for i in h}
        assert [len(h) for h in hits] == [50, 50, 50]  # k live hits, tombstones skipped
        with pytest.raises(IndexInputError, match="unknown ids"):
            ix.metadata(["d0005"])

    check(index)
    index.save()
    reopened = open_index(uri)
    check(reopened)
    reopened.add(["d0005"], vectors[5:6])  # a removed id can come back (a new label: never a tombstone's)
    assert reopened.search(vectors[5:6], 1)[0] == [["d0005"]]
    assert len(set(reopened.idmap.column("faiss_id").to_pylist())) == len(reopened)
    assert reopened.metadata(["d0005"]) == [{"label": None}]


class CrashingIndex(VectorIndex):
    """Dies after staging every file, just before the rename that publishes them.

    A subclass rather than a monkeypatch: save() itself runs unchanged, and the failure
    lands inside storage.publish_dir's with-block as a real crash (disk full, kill) would.
    """

    def write(self, folder) -> None:
        super().write(folder)
        raise OSError("simulated crash while saving")


def test_crash_during_save_keeps_previous_index(embeddings_uri, digits, tmp_path):
    ids, vectors, _ = digits
    uri = _build(embeddings_uri, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()}

    crashing = CrashingIndex.load(uri)
    crashing.add(["new"], vectors[:1])
    crashing.remove(["d0001"])
    with pytest.raises(OSError, match="simulated crash"):
        crashing.save()

    assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no staging folder left behind
    index = open_index(uri)
    assert len(index) == len(ids) and index.search(vectors[1:2], 1)[0] == [["d0001"]]
    with pytest.raises(IndexInputError):
        index.metadata(["new"])


def _snapshot(index: VectorIndex, vectors):
    found, scores = index.search(vectors[:5], 5)
    return len(index), index.info(), found, scores.tolist(), index.idmap.to_pylist()


def test_bad_inputs_leave_index_unchanged(embeddings_uri, digits, tmp_path):
    _, vectors, _ = digits
    index = open_index(_build(embeddings_uri, tmp_path))
    before = _snapshot(index, vectors)
    nan, inf = vectors[:2].copy(), vectors[:2].copy()
    nan[1, 3], inf[0, 0] = np.nan, np.inf
    bad_calls = {
        "wrong dim": (lambda: index.add(["a"], vectors[:1, :32]), "shape"),
        "NaN": (lambda: index.add(["a", "b"], nan), "NaN or inf"),
        "inf": (lambda: index.search(inf, 3), "NaN or inf"),
        "1-D": (lambda: index.search(vectors[0], 3), "shape"),
        "k=0": (lambda: index.search(vectors[:1], 0), "k must be"),
        "k=0 by id": (lambda: index.search_by_id(["d0000"], 0), "k must be"),
        "duplicate in call": (lambda: index.add(["a", "a"], vectors[:2]), "duplicate ids: 'a'"),
        "already present": (lambda: index.add(["a", "d0003"], vectors[:2]), "already in the index: 'd0003'"),
        "count mismatch": (lambda: index.add(["a"], vectors[:2]), "1 ids but 2 vectors"),
        "bad metadata": (lambda: index.add(["a"], vectors[:1], [{"label": "seven"}]), "metadata"),
        "unknown remove": (lambda: index.remove(["d0000", "nope"]), "unknown ids: 'nope'"),
        "unknown search id": (lambda: index.search_by_id(["nope"], 3), "unknown ids"),
        "not numbers": (lambda: index.search([["x"] * 64], 3), "numbers"),
    }
    for name, (call, message) in bad_calls.items():
        with pytest.raises(IndexInputError, match=message) as error:
            call()
        assert "\n" not in str(error.value), name
        assert _snapshot(index, vectors) == before, name


def test_build_errors(embeddings_uri, tmp_path):
    out = str(tmp_path / "index")
    with pytest.raises(IndexInputError, match="'NoSuchIndex12'") as error:
        build_index(embeddings_uri, out, factory="NoSuchIndex12", progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(IndexInputError, match="cannot train 'IVF4096,Flat'"):
        build_index(embeddings_uri, out, factory="IVF4096,Flat", progress=False)
    with pytest.raises(IndexInputError, match="unknown metric"):
        build_index(embeddings_uri, out, metric="cosine", progress=False)
    assert not storage.exists(out) and list(tmp_path.iterdir()) == []

    build_index(embeddings_uri, out, progress=False)
    with pytest.raises(storage.StorageError, match="output exists"):
        build_index(embeddings_uri, out, factory="IVF16,Flat", progress=False)
    assert open_index(out).info()["factory"] == "Flat"
    assert (
        build_index(embeddings_uri, out, factory="IVF16,Flat", overwrite=True, progress=False)["count"]
        == 1797
    )
    assert open_index(out).info()["factory"] == "IVF16,Flat"


@pytest.mark.parametrize("shards", [1, 2])
def test_duplicate_ids_in_embeddings_rejected(tmp_path, digits, shards, request):
    ids, vectors, _ = digits
    if shards > 1:  # each file goes to its own partition task: the shard task finds the duplicate
        request.getfixturevalue("ray_local")
    folder = tmp_path / "emb"
    folder.mkdir()
    for n, part in enumerate([["a", "b"], ["c", "a"]]):
        table = embeddings_table(part, vectors[2 * n : 2 * n + 2], None, {"normalized": "false"})
        pq.write_table(table, folder / f"part-{n:05d}.parquet")
    with pytest.raises(IndexInputError, match="^duplicate ids: 'a'$"):
        build_index(str(folder), str(tmp_path / "index"), shards=shards, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]  # nothing staged is left


def test_metadata_and_fingerprint(embeddings_uri, digits, tmp_path):
    ids, _, labels = digits
    index = open_index(_build(embeddings_uri, tmp_path))
    sample = ids[10:20]
    assert index.metadata(sample) == [{"label": int(x)} for x in labels[10:20]]
    json.dumps(index.metadata(sample))
    assert index.fingerprint == "digits-pixels"
    check_fingerprint(index, "digits-pixels")
    check_fingerprint(index, None)  # callers without a fingerprint are not refused
    with pytest.raises(IndexInputError, match="model other but the index was built from model digits-pixels"):
        check_fingerprint(index, "other")


def test_build_tasks_pinned_to_the_driver_node_run_there(ray_local):
    # A remote --out stages in a folder of the driver's machine: its tasks must all run there.
    import ray

    from system.index.build import _ray_map

    def node_of_task() -> str:  # nested: pickled by value (workers cannot import tests/)
        return ray.get_runtime_context().get_node_id()

    nodes = _ray_map(node_of_task, [(), (), ()], on_driver_node=True)
    assert set(nodes) == {ray.get_runtime_context().get_node_id()}


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_replacing_an_artifact_never_leaves_its_path_empty(tmp_path):
    """Another process reading while a folder is replaced 300 times never finds it missing.

    (With two renames, old folder away and new one in, a reader on this 2-core machine
    found the path empty 566 times in one such run.)
    """
    target, stop = tmp_path / "artifact", tmp_path / "stop"
    with storage.publish_dir(str(target)) as staging:
        (staging / "v").write_text("0")
    watch = f"""
import os
misses = reads = 0
while not os.path.exists({str(stop)!r}):
    reads += 1
    misses += not os.path.exists({str(target / "v")!r})
print(misses, reads)
"""
    reader = subprocess.Popen([sys.executable, "-c", watch], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # the reader is polling before the first replacement
        for i in range(1, 301):
            with storage.publish_dir(str(target), overwrite=True) as staging:
                (staging / "v").write_text(str(i))
    finally:
        stop.touch()
        misses, reads = map(int, reader.communicate(timeout=60)[0].split())
    assert reads > 1000 and misses == 0
    assert (target / "v").read_text() == "300"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "stop"]  # no old copy left
