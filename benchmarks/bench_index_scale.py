"""Index build at scale: vectors/s per core, bytes/vector on clustered vectors, and a 1B projection.

    .venv/bin/python benchmarks/bench_index_scale.py [--count 1000000] [--dim 128] [--memory-budget 256M]

Writes `--count` clustered unit vectors (1,000 Gaussian clusters) as embeddings Parquet,
builds them with `build_index(factory="auto", memory_budget=...)` (the budget forces the
compressed IVF-PQ + refine recipe used at large scale), and evaluates recall@10 against
exact search. The baseline, measured in the same run on the same data, is an exact Flat
index: its add rate and its 4*dim bytes/vector.

From the measured rate per core and bytes/vector it prints the projected cost of 1B
vectors of the same dim (shards, RAM per shard, build hours on N cores), and appends a
row to benchmarks/RESULTS.md. The projection assumes adding dominates and scales linearly
across shards (they share nothing); training is on a fixed 100k sample and not scaled.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BILLION = 1_000_000_000


def write_clustered(folder: Path, count: int, dim: int, per_file: int = 100_000) -> None:
    from system.embed.batch import embeddings_table

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    meta = {"fingerprint": "synthetic", "normalized": "true", "dim": str(dim)}
    folder.mkdir(parents=True)
    for n, start in enumerate(range(0, count, per_file)):
        size = min(per_file, count - start)
        x = centres[rng.integers(0, 1000, size)] + 0.5 * rng.standard_normal((size, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"s{i}" for i in range(start, start + size)]
        pq.write_table(embeddings_table(ids, x, None, meta), folder / f"part-{n:05d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--memory-budget", default="256M", help="per shard; forces the compressed recipe")
    args = parser.parse_args()

    import faiss

    from system.index import build_index, evaluate_index
    from system.index.build import iter_batches, scan

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-index-scale-"))
    start = time.perf_counter()
    write_clustered(work / "emb", args.count, args.dim)
    print(f"wrote {args.count} x {args.dim} in {time.perf_counter() - start:.0f}s", flush=True)

    files, counts, _, _ = scan(str(work / "emb"))
    flat, start = faiss.IndexFlatIP(args.dim), time.perf_counter()
    for _, vectors, _ in iter_batches(files, counts):  # same streaming read as the build
        flat.add(vectors)
    flat_rate = args.count / (time.perf_counter() - start) / cores
    del flat

    manifest = build_index(
        str(work / "emb"), str(work / "ix"), "auto", memory_budget=args.memory_budget, progress=False
    )
    rate = args.count / manifest["build_seconds"] / cores
    report = evaluate_index(str(work / "ix"), num_queries=200)
    bpv = report["bytes_per_vector"]
    print(f"{manifest['factory']}: {manifest['reason']}")
    print(
        f"build {manifest['build_seconds']:.0f}s = {rate:.0f} vectors/s per core ({cores} cores); "
        f"{bpv:.0f} bytes/vector; recall@10 {report['recall@10']:.3f} at {report['search_params']}; "
        f"{report['qps_batch256']:.0f} QPS at batch 256"
    )
    print(f"baseline exact Flat: {flat_rate:.0f} vectors/s per core, {4 * args.dim} bytes/vector")
    print(
        f"ratio: build rate x{rate / flat_rate:.2f} of Flat's, memory x{bpv / (4 * args.dim):.2f} of Flat's"
    )

    # 1B projection with the recipe measured here (IVF-PQ + refine codes): RAM per shard from
    # the measured bytes/vector, hours from the measured rate per core. Coarse lists grow
    # with the shard (4*sqrt(n)), which changes the centroids' few MiB, not the codes.
    table = ["| shards | vectors/shard | RAM/shard | build h, 64 cores | build h, 512 cores |"]
    table.append("| --- | --- | --- | --- | --- |")
    summary = []
    for shards in (16, 32, 64, 128):
        per = BILLION // shards
        ram = bpv * per / 2**30
        hours = [BILLION / (rate * c) / 3600 for c in (64, 512)]
        table.append(f"| {shards} | {per:,} | {ram:.1f} GiB | {hours[0]:.1f} | {hours[1]:.2f} |")
        summary.append(f"{shards} shards: {ram:.1f} GiB/shard")
    summary.append(f"{hours[0]:.1f} h on 64 cores, {hours[1]:.2f} h on 512")
    print(f"\nProjected 1B vectors of dim {args.dim} with {manifest['factory'].split(',', 1)[1]} codes:")
    print("\n".join(table))
    results = ROOT / "benchmarks" / "RESULTS.md"
    with open(results, "a") as f:
        f.write(
            f"| {date.today()} | bench_index_scale | {args.count:,} clustered synthetic x {args.dim}, "
            f"auto with budget {args.memory_budget} -> {manifest['factory']} | {rate:.0f} vectors/s/core, "
            f"{bpv:.0f} B/vec, recall@10 {report['recall@10']:.3f} | exact Flat add "
            f"{flat_rate:.0f} vectors/s/core, {4 * args.dim} B/vec | memory x{bpv / (4 * args.dim):.2f}; "
            f"1B projection: {'; '.join(summary)} | {machine()} |\n"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
