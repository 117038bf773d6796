"""Pretraining overhead: `repforge pretrain` under Ray Train vs a bare single-process PyTorch loop.

    .venv/bin/python benchmarks/bench_pretrain.py [--model resnet18] [--steps 30] [--batch-size 64] \
        [--strategy ddp|fsdp] [--workers 2]
    python benchmarks/bench_pretrain.py --gpu --model resnet50 --image-size 128 --batch-size 256   # a GPU

Same model, objective (SimCLR), global batch and data (real CIFAR-10 from ../shared when
present, else digits), measured in the same run:
- repforge: Ray Train with N workers x 1 thread; decoding and augmentation run as Ray
  Data tasks; images/s of the second half of the run (steady state: the first report
  window includes worker start-up and the pipeline's first blocks).
- baseline: one process with N threads, decoding + augmenting each batch in the loop.
With --gpu: one worker on the GPU (bf16 autocast) against the same loop on the GPU (its
augmentation runs in the loop's process, one image at a time, as a plain PyTorch script's
would without a DataLoader). Prints both and the ratio, and appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import CIFAR10, append_row  # benchmarks/common.py (scripts run by path)


def bare_loop_images_per_s(cfg, data: str, steps: int, threads: int, device: str = "cpu") -> float:
    """The baseline: no Ray, no DDP; the global batch in one process (bf16 autocast on a GPU)."""
    import torch

    from system.data.dataset import read_classes
    from system.data.transforms import preprocess_batch, preprocessing_config
    from system.train.module import build_model, train_mode
    from system.train.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = build_model(cfg, "pretrain", len(read_classes(data))).to(device)
    train_mode(module)
    optimizer = build_optimizer(module, cfg.train)
    pre = preprocessing_config(module.backbone, cfg.data.image_size)
    batch = cfg.train.batch_size * cfg.train.workers
    table = pq.read_table(data, columns=["image"]).slice(0, batch * (steps + 3))
    images = table.column("image").to_pylist()
    start = None
    for i in range(steps + 3):
        if i == 3:  # the first steps warm up allocators and caches
            start = time.perf_counter()
        views = preprocess_batch({"image": images[i * batch : (i + 1) * batch]}, pre, "ssl")
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            loss, _ = module({k: torch.from_numpy(v).to(device) for k, v in views.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - start)


def repforge_images_per_s(cfg, steps: int) -> float:
    from system.train import run_training

    run_training(cfg, "pretrain")
    metrics = Path(cfg.run.storage) / cfg.run.name / "metrics.jsonl"
    return json.loads(metrics.read_text().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--gpu", action="store_true", help="1 worker on the GPU vs the loop on the GPU")
    args = parser.parse_args()

    from system.config import build_config
    from system.data.dataset import digits_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    train = CIFAR10 / "train.parquet"
    data = str(train) if train.is_file() else digits_dataset(str(work / "digits"))[0]
    steps = 2 * (args.steps // 2)
    workers = 1 if args.gpu else args.workers
    threads = os.cpu_count() if args.gpu else workers
    device = "cuda" if args.gpu else "cpu"
    cfg = build_config(
        {
            "data": {
                "train": data,
                "image_size": args.image_size,
                "limit": args.batch_size * workers * (steps + 2),
            },
            "model": {"name": args.model},
            "objective": {"name": "simclr"},
            "train": {
                "workers": workers,
                "use_gpu": args.gpu,
                "batch_size": args.batch_size,
                "max_steps": steps,
                "strategy": args.strategy,
                "checkpoint_every": steps // 2,  # two report windows: start-up, then steady state
                "log_every": 5,
                "cpus_per_worker": 1 if args.gpu else 0.5,  # 1 thread each; leaves CPU for Ray Data
            },
            "run": {"storage": str(work / "runs"), "name": "bench"},
        }
    )
    data_file = data if data.endswith(".parquet") else str(next(Path(data).glob("*.parquet")))
    # The baseline before and after the Ray run, so load from other users of the machine
    # shows up as a spread instead of a bias.
    before = bare_loop_images_per_s(cfg, data_file, steps // 2, threads, device)
    ours = repforge_images_per_s(cfg, steps)
    after = bare_loop_images_per_s(cfg, data_file, steps // 2, threads, device)
    baseline = statistics.median([before, after])
    ratio = ours / baseline
    setup = (
        f"pretrain simclr {args.model} {args.image_size}px, {args.strategy}, "
        + (
            f"1 GPU worker, bf16, bare loop on the GPU (torch threads {threads}, augmenting in-loop)"
            if args.gpu
            else f"{workers} workers x 1 thread"
        )
        + f", global batch {args.batch_size * workers}, {steps} steps, steady-state half"
    )
    print(
        f"{setup}\nrepforge {ours:.1f} img/s, bare loop ({threads} threads) {baseline:.1f} img/s, "
        f"ratio {ratio:.2f}"
    )
    baseline_text = f"{baseline:.1f} img/s bare loop (before {before:.1f}, after {after:.1f})"
    append_row("bench_pretrain.py", setup, f"{ours:.1f} img/s", baseline_text, f"{ratio:.2f}")


if __name__ == "__main__":
    main()
