"""The compatibility gate: may a new model's queries search an index of an old model's embeddings?

    repforge compat check --old runs/v1/model --new runs/v2/model [--adapter runs/v2-to-v1] \
        --gallery runs/datasets/digits/train --queries runs/datasets/digits/test --k 10

Both labelled datasets are embedded with both models (Ray Data). The JSON report holds,
for the three pairs old_old (old queries, old gallery), new_old (new queries, through the
adapter when given, against the old gallery) and new_new:

    top-1 retrieval accuracy   the nearest gallery item has the query's label
    mAP@k                      mean over queries of sum_{i<=k} P@i * rel_i / min(k, R), R the
                               gallery items with the query's label

scored by exact search (inner product when the model's vectors are L2-normalised, else
L2 distance); a gallery item with the query's own id is skipped (the same image). The pair
is `compatible` when new_old >= old_old - margin (margin 0 by default). The report also names
both fingerprints (and the adapter's): serving accepts it for exactly that pair
(system.compat.gate).

    .venv/bin/python -m pytest -q tests/test_compat.py -k check
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from system import storage
from system.compat.fit import CompatError, Embedded, embed_dataset, load_adapter, model_meta

PAIRS = ("old_old", "new_old", "new_new")
CHUNK = 1024  # queries scored at once: bounds the score matrix to CHUNK x gallery floats


def ranked_labels(
    queries: np.ndarray, gallery: np.ndarray, query_ids, gallery_ids, gallery_labels, k: int, ip: bool
) -> np.ndarray:
    """[n_queries, k] labels of each query's k nearest gallery items, best first (exact search)."""
    position = {gid: i for i, gid in enumerate(gallery_ids)}
    k = min(k, len(gallery) - 1 if set(query_ids) & position.keys() else len(gallery))
    out = np.empty((len(queries), k), dtype=np.asarray(gallery_labels).dtype)
    sq = (gallery.astype(np.float32) ** 2).sum(1)
    for start in range(0, len(queries), CHUNK):
        q = queries[start : start + CHUNK]
        scores = q @ gallery.T if ip else 2 * q @ gallery.T - sq  # -||q - g||^2 up to a per-row constant
        for row, qid in enumerate(query_ids[start : start + CHUNK]):
            if qid in position:
                scores[row, position[qid]] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, 1).argsort(axis=1, kind="stable")[:, ::-1]
        out[start : start + len(q)] = np.asarray(gallery_labels)[np.take_along_axis(top, order, 1)]
    return out


def retrieval_scores(ranked: np.ndarray, query_labels, gallery_labels) -> tuple[float, float]:
    """(top-1 accuracy, mAP@k) from the ranked gallery labels of each query."""
    query_labels = np.asarray(query_labels)
    relevant = ranked == query_labels[:, None]
    k = ranked.shape[1]
    counts = dict(zip(*np.unique(np.asarray(gallery_labels), return_counts=True)))
    total = np.array([min(k, counts.get(label, 0)) for label in query_labels], np.float64)
    precision = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    ap = (precision * relevant).sum(1) / np.maximum(total, 1)
    return float(relevant[:, 0].mean()), float(ap.mean())


def pair_scores(queries: Embedded, gallery: Embedded, k: int, query_vectors=None) -> dict:
    """{"top1", "map_at_k"} of `queries` (or `query_vectors` in their place) against `gallery`."""
    vectors = queries.vectors if query_vectors is None else query_vectors
    ip = bool(gallery.meta.get("normalize", True))
    ranked = ranked_labels(vectors, gallery.vectors, queries.ids, gallery.ids, gallery.labels, k, ip)
    top1, mean_ap = retrieval_scores(ranked, queries.labels, gallery.labels)
    return {"top1": round(top1, 6), "map_at_k": round(mean_ap, 6)}


def build_report(embedded: dict, k: int, adapter=None, margin: float = 0.0) -> dict:
    """The gate's figures from {"old"|"new": {"gallery"|"queries": Embedded}}."""
    old, new = embedded["old"], embedded["new"]
    mapped = adapter.map(new["queries"].vectors) if adapter is not None else None
    if mapped is None and new["queries"].vectors.shape[1] != old["gallery"].vectors.shape[1]:
        raise CompatError(
            f"--new: {new['queries'].vectors.shape[1]}-dim embeddings cannot search the old model's "
            f"{old['gallery'].vectors.shape[1]}-dim gallery; fit an adapter (repforge compat fit)"
        )
    scores = {
        "old_old": pair_scores(old["queries"], old["gallery"], k),
        "new_old": pair_scores(new["queries"], old["gallery"], k, mapped),
        "new_new": pair_scores(new["queries"], new["gallery"], k),
    }
    report = {pair: scores[pair]["top1"] for pair in PAIRS}
    report["map_at_k"] = {pair: scores[pair]["map_at_k"] for pair in PAIRS}
    report.update(k=k, margin=margin, compatible=bool(report["new_old"] >= report["old_old"] - margin))
    report["rule"] = "new_old >= old_old - margin (top-1 retrieval accuracy)"
    return report


def _labelled(name: str, data: Embedded) -> Embedded:
    if data.labels is None:
        raise CompatError(f"{name}: the gate scores label retrieval; this dataset has no label column")
    return data


def _check_labelled(name: str, uri: str) -> None:
    from system.data.dataset import check_dataset

    try:
        check_dataset(uri, need_label=True)
    except (ValueError, OSError) as err:
        raise CompatError(f"{name}: {str(err).splitlines()[0]}") from None


def default_report_uri(storage_root: str, old_fp: str, new_fp: str, adapter_fp: str | None) -> str:
    name = f"{old_fp}-{new_fp}" + (f"-{adapter_fp}" if adapter_fp else "")
    return storage.join(storage.normalize(storage_root), "compat", f"{name}.json")


def run_check(
    old_uri: str,
    new_uri: str,
    gallery_uri: str,
    queries_uri: str,
    adapter_uri: str | None = None,
    k: int = 10,
    out_uri: str | None = None,
    storage_root: str = "runs",
    limit: int | None = None,
    margin: float = 0.0,
) -> tuple[str, dict]:
    """Embed, score, write the JSON report; returns (report URI, report)."""
    if k < 1:
        raise CompatError(f"--k: must be at least 1, got {k}")
    old_uri, new_uri = storage.normalize(old_uri), storage.normalize(new_uri)
    old_meta, new_meta = model_meta("--old", old_uri), model_meta("--new", new_uri)
    adapter = load_adapter(adapter_uri) if adapter_uri else None
    if adapter is not None:
        expected = {"old": old_meta["fingerprint"], "new": new_meta["fingerprint"]}
        got = {side: adapter.meta[side]["fingerprint"] for side in expected}
        if got != expected:
            raise CompatError(
                f"--adapter: maps model {got['new']} into {got['old']}, "
                f"not {expected['new']} into {expected['old']}"
            )
    datasets = {"gallery": storage.normalize(gallery_uri), "queries": storage.normalize(queries_uri)}
    for name, uri in datasets.items():  # both checked before any embedding starts
        _check_labelled(f"--{name}", uri)
    work = Path(tempfile.mkdtemp(prefix="repforge-compat-"))
    start = time.perf_counter()
    try:
        embedded = {
            side: {
                name: _labelled(f"--{name}", embed_dataset(model, uri, work, limit))
                for name, uri in datasets.items()
            }
            for side, model in (("old", old_uri), ("new", new_uri))
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = build_report(embedded, k, adapter, margin)
    report.update(
        old={"fingerprint": old_meta["fingerprint"], "uri": old_uri},
        new={"fingerprint": new_meta["fingerprint"], "uri": new_uri},
        adapter=(
            {"fingerprint": adapter.fingerprint, "uri": adapter.uri, "kind": adapter.meta["kind"]}
            if adapter is not None
            else None
        ),
        gallery={"uri": datasets["gallery"], "rows": len(embedded["old"]["gallery"].ids)},
        queries={"uri": datasets["queries"], "rows": len(embedded["old"]["queries"].ids)},
        seconds=round(time.perf_counter() - start, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    fingerprints = (old_meta["fingerprint"], new_meta["fingerprint"], adapter and adapter.fingerprint)
    out_uri = storage.normalize(out_uri) if out_uri else default_report_uri(storage_root, *fingerprints)
    storage.write_text(out_uri, json.dumps(report, indent=2) + "\n")
    verdict = "compatible" if report["compatible"] else "NOT compatible"
    print(
        f"compat check: old/old {report['old_old']:.4f}, new/old {report['new_old']:.4f}, "
        f"new/new {report['new_new']:.4f} (top-1): {verdict}"
    )
    return out_uri, report
