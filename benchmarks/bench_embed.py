"""Batch embedding throughput: `repforge embed` (Ray Data actor pool) vs a bare in-process loop.

    .venv/bin/python benchmarks/bench_embed.py [--rows 5000] [--model test_resnet] [--repeats 3]
    python benchmarks/bench_embed.py --model resnet50 --image-size 224 --rows 20000   # a GPU machine

Baseline, measured in the same run: one process decoding, preprocessing and running the
model batch by batch, with no Ray (on the GPU with bf16 autocast when there is one, decoding
on all CPU threads). Prints images/s for both and their ratio (median of
--repeats), and appends a dated row with the machine to benchmarks/RESULTS.md. Uses real
CIFAR-10 test (../shared, or $REPFORGE_CIFAR10) when present, else scikit-learn's digits;
--image-size resizes it to the model's input.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import CIFAR10, append_row  # benchmarks/common.py (scripts run by path)

CIFAR = CIFAR10 / "test.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="model input size (images are resized)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    import torch

    from system.data.dataset import digits_dataset
    from system.data.transforms import preprocessing_config
    from system.embed.batch import embed_images, run_embed
    from system.models.artifact import Embedder, create_backbone, load_artifact, save_model

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    data = str(CIFAR) if CIFAR.is_file() else digits_dataset(str(work / "digits"))[0]
    backbone = create_backbone(args.model, {})
    pre = preprocessing_config(backbone, args.image_size)
    meta = {"timm_name": args.model, "timm_kwargs": {}, "preprocessing": pre}
    save_model(str(work / "model"), Embedder(backbone), meta)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_artifact(str(work / "model"), device)
    images = pq.read_table(data, columns=["image"]).column("image").to_pylist()[: args.rows]
    rows = len(images)

    def bare() -> float:
        start = time.perf_counter()
        for i in range(0, rows, args.batch_size):
            embed_images(model, meta["preprocessing"], images[i : i + args.batch_size], device)
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
    source = Path(data).parent.name
    setup = f"{args.model} {args.image_size}px, {rows} rows of {source}, batch {args.batch_size}"
    ours_text, base_text = f"{ours:.0f} img/s", f"bare loop {baseline:.0f} img/s"
    append_row("bench_embed.py", setup, ours_text, base_text, f"{ratio:.2f}")
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
