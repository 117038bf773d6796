"""`--factory auto` by measurement (system/index/auto.py), with real FAISS on real vectors.

The choice itself depends on timings (never asserted); what is checked is that the
decision follows the measurements recorded in the manifest, that a non-exact recipe wins
where one is faster at the target, and the rules around it (tiny sets, memory budget,
time bound).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from system.embed.batch import embeddings_table
from system.index import IndexInputError, build_index, evaluate_index
from system.index.auto import CANDIDATES, _decide, estimate, select_factory


def _write(folder, vectors) -> str:
    folder.mkdir(parents=True)
    meta = {"fingerprint": "fp", "normalized": "true", "dim": str(vectors.shape[1])}
    ids = [f"v{i}" for i in range(len(vectors))]
    pq.write_table(embeddings_table(ids, vectors, None, meta), folder / "part-00000.parquet")
    return str(folder)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _check_record(manifest: dict, target: float) -> None:
    auto = manifest["auto"]
    assert auto["candidates"] and auto["winner"] and auto["why"] in manifest["reason"]
    at = {c["name"]: c["at_target"] for c in auto["candidates"]}
    reached = {n: p["qps"] for n, p in at.items() if p}
    if reached:  # the winner has the most queries/s of those reaching the target
        assert auto["winner"] == max(reached, key=reached.get)
        assert at[auto["winner"]]["recall@10"] >= target
    for c in auto["candidates"]:  # every candidate's operating points are kept
        assert c["operating_points"] and all(
            {"params", "recall@10", "qps"} <= set(p) for p in c["operating_points"]
        )


def test_auto_picks_a_faster_recipe_than_exact_and_says_why(cifar10_dir, tmp_path):
    # 6,000 real CIFAR-10 images as 8x8 RGB averages (192 dims): exact search scans all of
    # them per query; a graph or IVF index is several times faster at recall@10 0.95.
    blobs = pq.read_table(cifar10_dir / "test.parquet", columns=["image"]).column("image").to_pylist()[:6000]
    pixels = np.stack(
        [np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((8, 8), Image.BOX)) for b in blobs]
    )
    vectors = pixels.reshape(len(pixels), -1).astype(np.float32)
    uri = _write(tmp_path / "emb", _unit(vectors - vectors.mean(axis=0)))
    manifest = build_index(uri, str(tmp_path / "ix"), progress=False, tune_seconds=30)
    _check_record(manifest, 0.95)
    auto = manifest["auto"]
    names = {c["name"] for c in auto["candidates"]}
    assert "exact" in names and len(names) >= 2, auto["skipped"]  # the rest may run out of time
    exact_qps = next(c for c in auto["candidates"] if c["name"] == "exact")["at_target"]["qps"]
    faster = [c for c in auto["candidates"] if c["at_target"] and c["at_target"]["qps"] > exact_qps]
    assert faster and auto["winner"] != "exact", auto["why"]
    assert (
        manifest["factory"] == estimate(auto["winner"], 6_000, 192)[0] != "Flat"
    )  # nlist for the full count
    assert "exact search" in auto["why"]
    report = evaluate_index(str(tmp_path / "ix"), num_queries=100)
    assert report["recall@10"] >= 0.9, report


def test_auto_rules_tiny_budget_time(tmp_path):
    digits = _unit(load_digits().data.astype(np.float32))
    uri = _write(tmp_path / "emb", digits)
    # Tiny: exact without measuring.
    manifest = build_index(uri, str(tmp_path / "tiny"), progress=False)
    assert (
        manifest["factory"] == "Flat"
        and "tiny" in manifest["reason"]
        and manifest["auto"]["candidates"] == []
    )
    # Measured even at this size when asked to (tiny_count=0); a budget below exact's
    # 1,797 x 272 bytes leaves only compressed candidates, all of them measured.
    budget = 300 * 1024
    factory, reason, ram, record = select_factory(digits, len(digits), "ip", budget, 0.95, 30, tiny_count=0)
    assert ram <= budget and "exact" not in {c["name"] for c in record["candidates"]}
    assert factory.startswith(("HNSW", "IVF")) and "measured" in reason
    _check_record({"auto": record, "reason": reason, "factory": factory}, 0.95)
    # The time bound: candidates past it are named as not measured.
    *_, hurried = select_factory(digits, len(digits), "ip", 10**9, 0.95, 1e-3, tiny_count=0)
    assert len(hurried["candidates"]) <= 1 and hurried["skipped"]
    with pytest.raises(IndexInputError, match="no index recipe fits"):
        select_factory(digits, 10**9, "ip", 2**20)
    with pytest.raises(IndexInputError, match="tune-seconds"):
        build_index(uri, str(tmp_path / "bad"), progress=False, tune_seconds=0)


def test_decision_follows_the_measurements():
    def cand(name, points):
        return {"name": name, "factory": name, "operating_points": points}

    fits = {n: (n, 1) for n in CANDIDATES}
    measured = [
        cand("exact", [{"params": {}, "recall@10": 1.0, "qps": 1000.0}]),
        cand(
            "hnsw_sq8",
            [
                {"params": {"efSearch": 16}, "recall@10": 0.9, "qps": 9000.0},
                {"params": {"efSearch": 32}, "recall@10": 0.97, "qps": 5000.0},
            ],
        ),
        cand("ivf_sq8", [{"params": {"nprobe": 4}, "recall@10": 0.96, "qps": 4000.0}]),
    ]
    factory, reason, _, record = _decide(measured, [], fits, 10_000, 9_800, 200, 0.95)
    assert factory == "hnsw_sq8" and "x5.00 exact search" in reason and "next ivf_sq8" in reason
    slow = [measured[0], cand("ivf_sq8", [{"params": {"nprobe": 4}, "recall@10": 0.96, "qps": 500.0}])]
    assert _decide(slow, [], fits, 10_000, 9_800, 200, 0.95)[0] == "exact"  # nothing faster: exact
    short = [cand("ivf_sq8", [{"params": {"nprobe": 64}, "recall@10": 0.9, "qps": 500.0}])]
    assert "came closest" in _decide(short, [], fits, 10_000, 9_800, 200, 0.95)[1]
