"""Batch embedding throughput: `repforge embed` (Ray Data actor pool) vs a bare in-process loop.

    .venv/bin/python benchmarks/bench_embed.py [--rows 5000] [--model test_resnet] [--repeats 3]

Baseline, measured in the same run: one process decoding, preprocessing and running the
model batch by batch, with no Ray. Prints images/s for both and their ratio (median of
--repeats), and appends a dated row with the machine to benchmarks/RESULTS.md. Uses real
CIFAR-10 from ../shared when present, else scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
from common import machine  # benchmarks/common.py (scripts run by path)

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "test.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    import torch

    from system.data import digits_dataset
    from system.embed import embed_images, run_embed
    from system.models import Embedder, create_backbone, load_artifact, save_model
    from system.transforms import preprocessing_config

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    data = str(CIFAR) if CIFAR.is_file() else digits_dataset(str(work / "digits"))[0]
    backbone = create_backbone(args.model, {})
    meta = {"timm_name": args.model, "timm_kwargs": {}, "preprocessing": preprocessing_config(backbone, 32)}
    save_model(str(work / "model"), Embedder(backbone), meta)
    model, meta = load_artifact(str(work / "model"))
    images = pq.read_table(data, columns=["image"]).column("image").to_pylist()[: args.rows]
    rows = len(images)

    def bare() -> float:
        start = time.perf_counter()
        for i in range(0, rows, args.batch_size):
            embed_images(model, meta["preprocessing"], images[i : i + args.batch_size])
        return rows / (time.perf_counter() - start)

    ray.init(include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def with_ray() -> float:
        out = work / "emb"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        run_embed(str(work / "model"), data, str(out), batch_size=args.batch_size, limit=rows)
        return rows / (time.perf_counter() - start)

    torch.set_num_threads(os.cpu_count() or 1)
    baseline = statistics.median(bare() for _ in range(args.repeats))
    ours = statistics.median(with_ray() for _ in range(args.repeats))
    ratio = ours / baseline
    print(f"bare loop: {baseline:.0f} img/s; repforge embed: {ours:.0f} img/s; ratio {ratio:.2f}")
    results = ROOT / "benchmarks" / "RESULTS.md"
    with open(results, "a") as f:
        f.write(
            f"| {date.today()} | bench_embed | {args.model}, {rows} rows of {Path(data).parent.name}, "
            f"batch {args.batch_size} | {ours:.0f} img/s | bare loop {baseline:.0f} img/s | "
            f"{ratio:.2f} | {machine()} |\n"
        )
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
