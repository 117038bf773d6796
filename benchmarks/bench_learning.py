"""Is pretraining learning? SimCLR vs supervised vs random init, kNN top-1 on CIFAR-10 test.

    .venv/bin/python benchmarks/bench_learning.py [--minutes 20] [--model test_resnet] [--batch-size 64]
    .venv/bin/python benchmarks/bench_learning.py --minutes 0 --steps 300   # equal steps instead

Same architecture, data (CIFAR-10 train from ../shared, 32x32), global batch and time
budget for `simclr` and `supervised`: `train.max_minutes`, so each run's step count (and
the end of its cosine schedule) is what fits in the budget on this machine; the steps and
wall time of each run are printed and recorded. `--minutes 0 --steps N` gives both the
same number of steps instead (reproducible, not a fixed budget). The score is the kNN
top-1 (k=20, cosine, leave-one-out) of the final embeddings on the 10,000 test images,
which every run reports on `data.val`; the random-init baseline is the same computation
on the untrained model. Appends a row to benchmarks/RESULTS.md. Needs ../shared/datasets/cifar10.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import CIFAR10, append_row  # benchmarks/common.py (scripts run by path)


def random_init_knn(model_name: str, test: str) -> float:
    """kNN top-1 of an untrained backbone's embeddings of the test split (in-process)."""
    import pyarrow.parquet as pq
    import torch

    from system.data.transforms import eval_transform, images_to_tensor, preprocessing_config
    from system.metrics import knn_accuracy
    from system.models.artifact import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone(model_name, {}).eval()
    transform = eval_transform(preprocessing_config(backbone, 32))
    table = pq.read_table(test, columns=["image", "label"])
    images, labels = table.column("image").to_pylist(), torch.tensor(table.column("label").to_pylist())
    with torch.no_grad():
        features = torch.cat(
            [
                backbone(torch.from_numpy(images_to_tensor(images[i : i + 500], transform)))
                for i in range(0, len(images), 500)
            ]
        )
    return knn_accuracy(features, labels, k=20)


def trained_knn(objective: str, args, storage: Path) -> tuple[float, float, int]:
    """Train with `objective`; (kNN top-1 on the test split at the end, wall seconds, steps)."""
    from system.config import build_config
    from system.train import run_training

    cfg = build_config(
        {
            "data": {
                "train": str(CIFAR10 / "train.parquet"),
                "val": str(CIFAR10 / "test.parquet"),
                "image_size": 32,
            },
            "model": {"name": args.model},
            "objective": {"name": objective, "proj_dim": 128},
            "train": {
                "workers": 2,
                "batch_size": args.batch_size,
                "max_steps": args.steps,
                "max_minutes": args.minutes or None,
                "lr": args.lr,
                "warmup_steps": args.warmup,
                "cpus_per_worker": 0.5,
                "log_every": 25,
            },
            "run": {"storage": str(storage), "name": objective},
        }
    )
    start = time.perf_counter()
    run_training(cfg, "pretrain")
    seconds = time.perf_counter() - start
    last = json.loads((storage / objective / "metrics.jsonl").read_text().splitlines()[-1])
    return last["knn_acc"], seconds, last["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--minutes", type=float, default=20.0, help="time budget per run; 0: --steps each")
    parser.add_argument("--steps", type=int, default=100_000, help="most steps (with --minutes 0: the steps)")
    parser.add_argument("--warmup", type=int, default=50, help="lr warmup steps")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker (2 workers)")
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    if not (CIFAR10 / "train.parquet").is_file():
        sys.exit(f"needs real CIFAR-10 at {CIFAR10}")

    storage = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    random_acc = random_init_knn(args.model, str(CIFAR10 / "test.parquet"))
    simclr_acc, simclr_s, simclr_steps = trained_knn("simclr", args, storage)
    supervised_acc, supervised_s, supervised_steps = trained_knn("supervised", args, storage)
    length = f"{args.minutes:g} min budget each" if args.minutes else f"{args.steps} steps each"
    setup = (
        f"CIFAR-10 32px {args.model}, 2 workers, global batch {2 * args.batch_size}, {length}: simclr "
        f"{simclr_steps} steps in {simclr_s / 60:.1f} min, supervised {supervised_steps} steps in "
        f"{supervised_s / 60:.1f} min (wall, start-up and final kNN included); kNN top-1 k=20 on test"
    )
    print(f"{setup}\nrandom init {random_acc:.3f}  simclr {simclr_acc:.3f}  supervised {supervised_acc:.3f}")
    append_row(
        "bench_learning.py",
        setup,
        f"simclr {simclr_acc:.3f}",
        f"random init {random_acc:.3f}; supervised {supervised_acc:.3f}",
        f"simclr - random {simclr_acc - random_acc:+.3f}",
    )


if __name__ == "__main__":
    main()
