"""Fine-tuning methods on CIFAR-10 from one pretrained artifact: top-1 vs trainable parameters.

    .venv/bin/python benchmarks/bench_finetune.py [--steps 300] [--pretrain-steps 600] [--model test_resnet]
    python benchmarks/bench_finetune.py --model vit_small_patch16_224 \
        --model-kwargs '{"img_size": 32, "patch_size": 4}' --lr-grid 3   # on a GPU machine

Transfer setup, small enough for a 2-core CPU (about 5-8 minutes): a supervised pretrain
on CIFAR-10's classes 0-4 gives the starting model artifact (written with
system.models.artifact.save_model, loaded with model.init like a real run); every method then
fine-tunes on classes 5-9 for the same number of steps (equal budget) with the same data
order, the model built by system.train.module.build_model and optimised by its
build_optimizer (system.train.optim: AdamW, 10x head lr, cosine). Top-1 is on CIFAR-10's test images of
classes 5-9. Prints a table and, for svfit and svfit+norms (finetune.train_norms), the
ratios to lora r=8 (accuracy gap, parameter ratio)
against the goal (within 1 point of lora r=8 with >= 10x fewer trainable parameters),
and appends a dated row with the machine to benchmarks/RESULTS.md. Plain in-process
torch loops (no Ray): this measures the methods, not the distribution. On a GPU (found
automatically) the steps run under bf16 autocast, as train.py's do. `--lr-grid 3` gives
every method the same small learning-rate search (its lr x 1/3, 1, 3), chosen on 100
held-out training images per class, so no method is judged at a badly chosen lr; the
test split is only read for the chosen run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import CIFAR10, machine  # benchmarks/common.py (scripts run by path)
from PIL import Image

from system.adapters.registry import count_parameters
from system.config import build_config
from system.models.artifact import Embedder, save_model
from system.train.module import build_model, train_mode
from system.train.optim import build_optimizer, cosine_with_warmup

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MEAN, STD = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
# (label, finetune overrides, lr)
METHODS = [
    ("full", {"method": "full"}, 1e-3),
    ("linear", {"method": "linear"}, 1e-3),
    ("norm", {"method": "norm"}, 1e-2),
    ("lora r=4", {"method": "lora", "rank": 4}, 3e-3),
    ("lora r=8", {"method": "lora", "rank": 8}, 3e-3),
    ("lora r=16", {"method": "lora", "rank": 16}, 3e-3),
    ("loha r=4", {"method": "loha", "rank": 4}, 3e-3),  # as many parameters as lora r=8
    ("ia3", {"method": "ia3"}, 1e-2),
    ("svfit", {"method": "svfit", "energy": 0.99}, 1e-2),
    ("svfit+norms", {"method": "svfit", "energy": 0.99, "train_norms": True}, 1e-2),
]
SVFIT_VARIANTS = ("svfit", "svfit+norms")


def load(split: str, classes: range, per_class: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode up to `per_class` images of each class (after its first `skip`) into a normalised tensor."""
    table = pq.read_table(CIFAR10 / f"{split}.parquet", columns=["image", "label"])
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    keep = np.concatenate([np.flatnonzero(labels == c)[skip : skip + per_class] for c in classes])
    images = table.column("image").take(keep).to_pylist()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((32, 32))) for b in images])
    x = torch.from_numpy(((pixels / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    return x.to(DEVICE), torch.from_numpy(labels[keep] - classes.start).to(DEVICE)


def config(model: str, kwargs: dict, init: str | None, lr: float, steps: int, finetune: dict):
    return build_config(
        {
            "model": {"name": model, "kwargs": kwargs, "init": init},
            "objective": {"name": "supervised"},
            "finetune": finetune,
            "train": {"lr": lr, "max_steps": steps, "weight_decay": 0.05},
        }
    )


def fit(module, cfg, job, x, y, steps, batch, seed=0) -> float:
    head_scale = cfg.finetune.head_lr_scale if job == "finetune" else 1.0
    optimizer = build_optimizer(module, cfg.train, head_scale)
    scheduler = cosine_with_warmup(optimizer, steps // 20, steps)
    order = torch.Generator().manual_seed(seed)  # same data order for every method
    train_mode(module)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=order).to(DEVICE)
        images = x[idx]
        flip = (torch.rand(batch, generator=order) < 0.5).to(DEVICE)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda"):
            loss, _ = module({"image": images, "label": y[idx]})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def top1(module, x, y) -> float:
    module.eval()
    with torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda"):
        correct = sum(
            (module.objective.head(module.backbone(x[i : i + 500])).argmax(-1) == y[i : i + 500]).sum().item()
            for i in range(0, len(x), 500)
        )
    return correct / len(x)


def pretrain(args) -> str:
    """Supervised pretraining on classes 0-4: the starting artifact every method fine-tunes from."""
    x_pre, y_pre = load("train", range(0, 5), 5000)
    torch.manual_seed(0)
    cfg = config(args.model, args.model_kwargs, None, args.pretrain_lr, args.pretrain_steps, {})
    module = build_model(cfg, "pretrain", 5).to(DEVICE)
    seconds = fit(module, cfg, "pretrain", x_pre, y_pre, args.pretrain_steps, args.batch)
    artifact = Path(tempfile.mkdtemp(prefix="bench-finetune-")) / "pretrain"
    save_model(
        str(artifact),
        Embedder(module.backbone),
        {"timm_name": args.model, "timm_kwargs": args.model_kwargs, "preprocessing": {"size": 32}},
    )
    print(f"pretrained on classes 0-4 ({len(x_pre)} images) in {seconds:.0f}s -> {artifact}", flush=True)
    return str(artifact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="timm kwargs as JSON")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--lr-grid", type=int, choices=(1, 3), default=1, help="3: lr x 1/3, 1, 3 per method")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per method (equal budget)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--per-class", type=int, default=1000, help="fine-tuning training images per class")
    parser.add_argument("--only", nargs="*", help="run only these methods (labels as printed), no record")
    parser.add_argument(
        "--lr", nargs="*", default=[], help="override a method's lr: LABEL=LR, e.g. svfit=0.05"
    )
    parser.add_argument("--init", help="reuse a starting artifact this script wrote (skips the pretrain)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed: head init and data order")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    started = time.perf_counter()

    x_ft, y_ft = load("train", range(5, 10), args.per_class)
    x_val, y_val = load("train", range(5, 10), 100, skip=args.per_class) if args.lr_grid > 1 else (None, None)
    x_test, y_test = load("test", range(5, 10), 1000)
    print(f"data: fine-tune {len(x_ft)}, test {len(x_test)} images", flush=True)
    artifact = args.init or pretrain(args)

    rows, lrs = [], dict(item.rsplit("=", 1) for item in args.lr)
    for label, finetune, lr in METHODS:
        if args.only and label not in args.only:
            continue
        base = float(lrs.get(label, lr))
        candidates = [base / 3, base, base * 3] if args.lr_grid > 1 else [base]
        tried = []
        for lr in candidates:
            torch.manual_seed(args.seed)
            cfg = config(args.model, args.model_kwargs, str(artifact), lr, args.steps, finetune)
            module = build_model(cfg, "finetune", 5).to(DEVICE)
            seconds = fit(module, cfg, "finetune", x_ft, y_ft, args.steps, args.batch, args.seed)
            val = top1(module, x_val, y_val) if x_val is not None else 0.0
            tried.append((val, lr, seconds, module))
            if len(candidates) > 1:
                print(f"  {label} lr {lr:g}: held-out top-1 {100 * val:.1f}%", flush=True)
        _, lr, seconds, module = max(tried, key=lambda t: t[0])
        backbone_trainable, backbone_total = count_parameters(module.backbone)
        acc = top1(module, x_test, y_test)
        rows.append((label, acc, backbone_trainable, backbone_total, seconds, lr))
        print(
            f"{label:10s} top-1 {100 * acc:5.2f}%  trainable {backbone_trainable:>7,d} "
            f"(backbone, + head)  lr {lr:g}  {seconds:.0f}s",
            flush=True,
        )

    by = {r[0]: r for r in rows}
    if args.only:
        return
    lora8 = by["lora r=8"]
    verdicts = {}
    for label in SVFIT_VARIANTS:
        gap = 100 * (lora8[1] - by[label][1])
        ratio = lora8[2] / max(1, by[label][2])
        met = "met" if gap <= 1 and ratio >= 10 else "not met"
        verdicts[label] = f"{label} {gap:+.2f} pt, {ratio:.1f}x fewer ({met})"
    print(
        f"\nvs lora r=8 (goal: <= 1 point behind, >= 10x fewer trainable backbone parameters): "
        f"{'; '.join(verdicts.values())}; total {time.perf_counter() - started:.0f}s"
    )
    if not args.no_record:
        table = "; ".join(f"{r[0]} {100 * r[1]:.1f}% / {r[2]:,d} (lr {r[5]:g})" for r in rows)
        setup = (
            f"{args.model} {json.dumps(args.model_kwargs) if args.model_kwargs else ''}, CIFAR-10 32px, "
            f"supervised pretrain cls 0-4 {args.pretrain_steps} steps, "
            f"fine-tune cls 5-9 (seed {args.seed}) "
            f"{len(x_ft)} imgs {args.steps} steps x {args.batch}"
            f"{', lr picked from x1/3, 1, 3 on held-out train images' if args.lr_grid > 1 else ''}; "
            f"top-1 / trainable backbone params: {table}"
        )
        ours = ", ".join(f"{v} {100 * by[v][1]:.1f}% {by[v][2]:,d} params" for v in SVFIT_VARIANTS)
        row = (
            f"| {date.today()} | bench_finetune.py | {setup} | {ours}"
            f" | lora r=8 {100 * lora8[1]:.1f}% {lora8[2]:,d} params | {'; '.join(verdicts.values())} "
            f"| {machine()} |\n"
        )
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as out:
            out.write(row)


if __name__ == "__main__":
    main()
