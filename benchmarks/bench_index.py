"""Search on real vectors: repforge `--factory auto` vs hnswlib vs exact FAISS, same run, same machine.

    .venv/bin/python benchmarks/bench_index.py [--data digits cifar-gray cifar-emb] [--limit 20000]

Data sets (real vectors, exact ground truth over the whole base for every query):
- digits: scikit-learn's 1,797 8x8 digits, L2-normalised (200 held out as queries);
- cifar-gray: CIFAR-10 raw pixels as 32x32 grayscale (1,024 dims, L2 metric), --limit
  train images as the base, 500 test images as queries;
- cifar-emb: CIFAR-10 through a random-init timm CNN (test_efficientnet, 256 dims; no
  trained model offline), centred and L2-normalised, --limit train / 500 test.
Absent ../shared: digits only.

Engines: exact FAISS (Flat); hnswlib M=16, efConstruction=200 at the smallest ef whose
recall@10 on these queries reaches 0.95; repforge's index built with `--factory auto`
(measured selection, system/index/auto.py), its search parameters re-swept on these
queries the same way (the cheapest point reaching 0.95). Queries/s with all cores on all
queries in one call (median of --repeats, engines interleaved) and at batch size 1 on
one thread; bytes per vector of the saved index. One row per data set in RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import CIFAR10, append_row  # noqa: E402

TARGET, K = 0.95, 10


def _cifar_pixels(split: str, n: int, gray: bool) -> np.ndarray:
    from PIL import Image

    blobs = pq.read_table(CIFAR10 / f"{split}.parquet", columns=["image"]).column("image").to_pylist()[:n]
    mode = "L" if gray else "RGB"
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert(mode)) for b in blobs])


def load(name: str, limit: int):
    """(base, queries, metric, description)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x = load_digits().data.astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        order = np.random.default_rng(0).permutation(len(x))
        return x[order[200:]], x[order[:200]], "ip", "digits 8x8 pixels (1,597 + 200 queries)"
    if name == "cifar-gray":
        base = _cifar_pixels("train", limit, True).reshape(limit, -1).astype(np.float32)
        queries = _cifar_pixels("test", 500, True).reshape(500, -1).astype(np.float32)
        return base, queries, "l2", f"CIFAR-10 raw grayscale 1024-d, {limit} + 500 queries"
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()

    def embed(pixels):
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
        with torch.inference_mode():
            return torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()

    base, queries = embed(_cifar_pixels("train", limit, False)), embed(_cifar_pixels("test", 500, False))
    mean = base.mean(axis=0)
    unit = lambda v: ((v - mean) / np.linalg.norm(v - mean, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return (
        unit(base),
        unit(queries),
        "ip",
        f"CIFAR-10 test_efficientnet (random init) 256-d, {limit} + 500 queries",
    )


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth)]))


def batch_qps(search, queries, repeats: int) -> list[float]:
    search(queries[:16])
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        search(queries)
        out.append(len(queries) / (time.perf_counter() - start))
    return out


def single_qps(search, queries, n: int = 200) -> float:
    start = time.perf_counter()
    for i in range(n):
        search(queries[i % len(queries) : i % len(queries) + 1])
    return n / (time.perf_counter() - start)


def run(name: str, limit: int, repeats: int, tune_seconds: float) -> None:
    import faiss
    import hnswlib

    from system.embed.batch import embeddings_table
    from system.index import build_index, open_index
    from system.index.tune import pick_point, set_search_params, sweep

    threads = os.cpu_count() or 1
    base, queries, metric, data = load(name, limit)
    n, dim = base.shape
    fm = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    truth = faiss.knn(queries, base, K, metric=fm)[1]
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))

    start = time.perf_counter()
    hnsw = hnswlib.Index(space=metric, dim=dim)
    hnsw.init_index(max_elements=n, M=16, ef_construction=200, random_seed=0)
    hnsw.set_num_threads(threads)
    hnsw.add_items(base, np.arange(n))
    hnsw_build = time.perf_counter() - start
    # Steps of about x1.2, as fine as the sweep of our own parameters: its smallest ef reaching 0.95.
    efs = (10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)
    for ef in efs:
        hnsw.set_ef(ef)
        if (hnsw_r := recall(hnsw.knn_query(queries, K)[0], truth)) >= TARGET:
            break
    hnsw.save_index(str(work / "hnswlib.bin"))
    hnsw_bytes = os.path.getsize(work / "hnswlib.bin") / n

    (work / "emb").mkdir()
    meta = {"fingerprint": "bench", "normalized": str(metric == "ip").lower(), "dim": str(dim)}
    ids = [str(i) for i in range(n)]
    pq.write_table(embeddings_table(ids, base, None, meta), work / "emb" / "part-00000.parquet")
    manifest = build_index(
        str(work / "emb"), str(work / "ix"), "auto", metric=metric, progress=False, tune_seconds=tune_seconds
    )
    print(f"{data}: auto -> {manifest['reason']}")
    ours = open_index(str(work / "ix")).index
    # The same treatment as hnswlib: the cheapest parameters reaching the target on these queries.
    point = pick_point(sweep(ours, queries, truth), TARGET)
    set_search_params(ours, point["params"])
    ours_r = recall(ours.search(queries, K)[1], truth)
    ours_bytes = sum(p.stat().st_size for p in (work / "ix").glob("index*.faiss")) / n
    exact = faiss.IndexFlat(dim, fm)
    exact.add(base)

    engines = {
        "exact": lambda q: exact.search(q, K),
        "hnswlib": lambda q: hnsw.knn_query(q, K),
        "repforge": lambda q: ours.search(q, K),
    }
    runs = {e: [] for e in engines}
    for _ in range(repeats):  # interleaved: load from other jobs hits every engine alike
        for e, search in engines.items():
            runs[e] += batch_qps(search, queries, 1)
    batch = {e: statistics.median(v) for e, v in runs.items()}
    faiss.omp_set_num_threads(1)
    hnsw.set_num_threads(1)
    single = {
        e: statistics.median(single_qps(s, queries) for _ in range(repeats)) for e, s in engines.items()
    }
    faiss.omp_set_num_threads(threads)
    sizes = {"exact": 4 * dim, "hnswlib": hnsw_bytes, "repforge": ours_bytes}
    recalls = {"exact": 1.0, "hnswlib": hnsw_r, "repforge": ours_r}
    for e in engines:
        print(
            f"  {e:9s} batch {batch[e]:9.0f} QPS  batch-1 {single[e]:8.0f} QPS  "
            f"recall {recalls[e]:.3f}  {sizes[e]:8.1f} B/vec"
        )
    rq, r1, rm = (
        batch["repforge"] / batch["hnswlib"],
        single["repforge"] / single["hnswlib"],
        ours_bytes / hnsw_bytes,
    )
    verdict = "met" if rq >= 1.5 and r1 >= 1.0 and rm <= 0.5 else "NOT met"
    print(f"  repforge/hnswlib: batch x{rq:.2f}, batch-1 x{r1:.2f}, memory x{rm:.2f} -> goal {verdict}")
    append_row(
        "bench_index",
        f"{data}; k=10, recall@10 >= {TARGET}; batch on {threads} threads, batch-1 on 1, median of {repeats}",
        f"auto {manifest['factory']} {point['params']}: batch {batch['repforge']:.0f} QPS, "
        f"batch-1 {single['repforge']:.0f} QPS, recall {ours_r:.3f}, {ours_bytes:.0f} B/vec",
        f"hnswlib ef={ef}: batch {batch['hnswlib']:.0f}, batch-1 {single['hnswlib']:.0f} QPS, "
        f"recall {hnsw_r:.3f}, {hnsw_bytes:.0f} B/vec (build {hnsw_build:.0f}s); exact: batch "
        f"{batch['exact']:.0f}, batch-1 {single['exact']:.0f} QPS, {4 * dim} B/vec",
        f"vs hnswlib: batch x{rq:.2f}, batch-1 x{r1:.2f}, memory x{rm:.2f} (goal x1.5 / x1.0 / x0.5: "
        f"{verdict}); vs exact: batch x{batch['repforge'] / batch['exact']:.2f}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["digits", "cifar-gray", "cifar-emb"])
    parser.add_argument("--limit", type=int, default=20_000, help="CIFAR-10 base rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tune-seconds", type=float, default=120.0)
    args = parser.parse_args()
    names = args.data if (CIFAR10 / "train.parquet").is_file() else ["digits"]
    for name in names:
        run(name, args.limit, args.repeats, args.tune_seconds)


if __name__ == "__main__":
    main()
