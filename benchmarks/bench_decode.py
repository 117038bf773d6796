"""Image decoding on several threads against one: the CPU side of embedding and serving.

    .venv/bin/python benchmarks/bench_decode.py [--images 256] [--size 320] [--model resnet50]

system.data.transforms.images_to_tensor decodes encoded images and applies the model's timm
eval transform (resize, centre crop, normalise): what the Serve embedder, Ray Data's
embedding actors and `embed_images` run before the model. On a GPU that is the bottleneck
(benchmarks/bench_gpu.py: one thread decodes about 200 photo-sized JPEGs/s, a GPU embeds
thousands), so it runs on as many threads as the process has CPUs. This script measures
images/s on all of this machine's CPUs against one thread, the same images in the same
run (median of 5), and appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import numpy as np
from common import append_row  # benchmarks/common.py (scripts run by path)
from PIL import Image

from system.data.transforms import eval_transform, images_to_tensor, preprocessing_config
from system.models.artifact import create_backbone


def photo_like_jpegs(count: int, size: int) -> list[bytes]:
    """Smooth random images (upsampled low-frequency noise) as JPEG bytes, about a photo's entropy."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def images_per_s(images: list[bytes], transform, threads: int, repeats: int = 5) -> float:
    images_to_tensor(images[:8], transform, threads)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        images_to_tensor(images, transform, threads)
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=320, help="side of the encoded JPEGs")
    parser.add_argument("--model", default="resnet50", help="timm model whose eval transform is used")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    pre = preprocessing_config(create_backbone(args.model))
    transform = eval_transform(pre)
    images = photo_like_jpegs(args.images, args.size)
    cpus = os.cpu_count() or 1
    one = images_per_s(images, transform, 1)
    many = images_per_s(images, transform, cpus)
    print(
        f"decode {args.size}px JPEG -> {pre['size']}px: 1 thread {one:.0f} img/s, "
        f"{cpus} threads {many:.0f} img/s"
    )
    if not args.no_record:
        append_row(
            "bench_decode.py",
            f"images_to_tensor: {args.images} {args.size}px JPEGs -> {args.model} eval transform "
            f"({pre['size']}px), median of 5",
            f"{cpus} threads: {many:.0f} img/s",
            f"1 thread: {one:.0f} img/s",
            f"{many / one:.2f}",
        )


if __name__ == "__main__":
    main()
