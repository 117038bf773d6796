"""One-GPU throughput of training (DDP vs FSDP2 at bf16) and of in-process embedding, without Ray.

    python benchmarks/bench_gpu.py [--models resnet50 vit_small_patch16_224] [--batch 256] [--steps 20]

Written for the GPU machines lent to development sessions, which have PyTorch but can't
install Ray (its wheel is too large to carry): every piece measured is the project's own
code, called without the Ray layer around it.

Training: the module a `repforge pretrain` worker builds (system.train.module.build_model,
supervised objective, 224 px), system.train.optim's AdamW and the step train.py runs, in a
one-rank NCCL process group. Images are synthetic and already on the GPU, so the input
pipeline (Ray Data on a cluster) is not part of the number. Variants:
- ddp fp32: DistributedDataParallel without autocast (TF32 off): the baseline;
- ddp bf16: DDP + bf16 autocast + channels_last, what train.py runs on a GPU;
- fsdp bf16: system.train.parallel.apply_fsdp (FSDP2 per block, bf16 params, fp32 reduce).
Reported: images/s (median of 3 windows), model FLOPs utilisation (FLOPs of one training
step counted by torch.utils.flop_counter, over the GPU's dense bf16 peak) and peak memory.

Embedding: Embedder.embed under bf16 autocast, as Ray Data's EmbedActor and the Serve
embedder run it: on a GPU-resident batch with and without channels_last, and from encoded
JPEG bytes (decode + timm eval transform on the CPU, on one thread and on all of them)
to show where a GPU replica's time goes.

Appends rows to benchmarks/RESULTS.md (or --results FILE).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from bench_decode import photo_like_jpegs  # benchmarks/ (scripts run by path)
from common import append_row
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from system.config import build_config
from system.data.transforms import preprocessing_config
from system.embed.batch import embed_images
from system.models.artifact import Embedder, create_backbone
from system.train.module import build_model, train_mode
from system.train.optim import build_optimizer
from system.train.parallel import apply_fsdp

# Dense bf16 tensor-core peak (no sparsity), from the vendors' data sheets.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(run_once, items: int, repeats: int, device: torch.device) -> float:
    """Items/s: the median over `repeats` timed windows of `run_once` (already warmed up)."""
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run_once()
        sync(device)
        rates.append(items / (time.perf_counter() - start))
    return statistics.median(rates)


def training_flops_per_image(module, batch: dict) -> float:
    """FLOPs of one forward + backward, counted on a small batch (they scale with its size)."""
    small = {k: v[:8] for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        loss, _ = module(small)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 8


def train_throughput(model_name: str, variant: str, args, device: torch.device) -> dict:
    cfg = build_config(
        {
            "model": {"name": model_name},
            "objective": {"name": "supervised"},
            "train": {"strategy": variant.split()[0], "batch_size": args.batch, "compile": args.compile},
        }
    )
    torch.manual_seed(0)
    module = build_model(cfg, "pretrain", 1000).to(device)
    batch = {
        "image": torch.randn(args.batch, 3, 224, 224, device=device),
        "label": torch.randint(0, 1000, (args.batch,), device=device),
    }
    flops = training_flops_per_image(module, batch)
    bf16 = variant.endswith("bf16") and device.type == "cuda"
    if bf16 and variant.startswith("ddp"):
        module = module.to(memory_format=torch.channels_last)  # as train.py does (FSDP2 can't)
    if variant.startswith("fsdp"):
        model = apply_fsdp(module, cfg.train, device)
        use_autocast = False  # FSDP2's MixedPrecisionPolicy casts the parameters itself
    else:
        model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        use_autocast = bf16
    train_mode(module)
    optimizer = build_optimizer(module, cfg.train)

    def steps(count: int) -> None:
        for _ in range(count):
            with torch.autocast(device.type, torch.bfloat16, enabled=use_autocast):
                loss, _ = model(batch)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps(5)  # warm-up: cuDNN autotuning, allocator, FSDP's first all-gathers
    rate = median_rate(lambda: steps(args.steps), args.batch * args.steps, 3, device)
    peak = peak_flops(device)
    result = {
        "images_per_s": rate,
        "gflops_per_image": flops / 1e9,
        "mfu": rate * flops / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
    }
    return result  # the model and optimizer go with this frame (empty_cache runs in main)


@torch.inference_mode()
def embed_throughput(model_name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    backbone = create_backbone(model_name)
    pre = preprocessing_config(backbone)
    model = Embedder(backbone).to(device).eval()
    batch = torch.randn(args.batch, 3, pre["size"], pre["size"], device=device)
    cuda = device.type == "cuda"

    def forward(count: int) -> None:
        for _ in range(count):
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                model.embed(batch).float()

    forward(3)
    plain = median_rate(lambda: forward(args.steps), args.batch * args.steps, 3, device)
    model = model.to(memory_format=torch.channels_last)
    forward(3)
    channels_last = median_rate(lambda: forward(args.steps), args.batch * args.steps, 3, device)

    # From bytes: decoding and the eval transform on one CPU thread, then the GPU forward.
    images = photo_like_jpegs(args.batch, 320)
    torch.set_num_threads(1)

    def from_bytes() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            embed_images(model, pre, images, str(device))

    from_bytes()
    end_to_end = median_rate(from_bytes, len(images), 3, device)
    torch.set_num_threads(os.cpu_count() or 1)  # embed_images decodes on torch's thread count
    from_bytes()
    all_threads = median_rate(from_bytes, len(images), 3, device)
    return {
        "forward": plain,
        "forward_channels_last": channels_last,
        "from_jpeg_1_thread": end_to_end,
        "from_jpeg_all_threads": all_threads,
    }


def start_process_group(device: torch.device) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = device if device.type == "cuda" else None
    dist.init_process_group(backend, rank=0, world_size=1, device_id=device_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window (3 windows)")
    parser.add_argument("--variants", nargs="+", default=["ddp fp32", "ddp bf16", "fsdp bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (FSDP only)")
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--no-record", action="store_true", help="print only; no RESULTS.md row")
    parser.add_argument("--cpu", action="store_true", help="run on CPU anyway (a smoke run of the script)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu:
        print("bench_gpu.py: no GPU here, nothing measured (--cpu runs it on the CPU as a smoke test)")
        return
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    args.no_record = args.no_record or device.type == "cpu"  # a CPU smoke run records nothing
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline is plain fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    start_process_group(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {gpu}; torch {torch.__version__}", flush=True)

    for name in args.models:
        results = {}
        for variant in args.variants:
            results[variant] = r = train_throughput(name, variant, args, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(
                f"train {name:24s} {variant:10s} {r['images_per_s']:8.0f} img/s  MFU {mfu:>6s}  "
                f"{r['gflops_per_image']:.1f} GFLOP/img (fwd+bwd)  peak {r['peak_memory_gb']:.1f} GiB",
                flush=True,
            )
        if not args.no_record and {"ddp fp32", "ddp bf16", "fsdp bf16"} <= results.keys():
            ddp, fsdp, fp32 = results["ddp bf16"], results["fsdp bf16"], results["ddp fp32"]

            def cell(r):
                mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
                return f"{r['images_per_s']:.0f} img/s{mfu}, {r['peak_memory_gb']:.1f} GiB"

            append_row(
                "bench_gpu.py",
                f"train {name} 224px supervised, batch {args.batch}, 1 GPU (1-rank NCCL group), synthetic "
                f"images on the GPU, {r['gflops_per_image']:.1f} GFLOP/img fwd+bwd, median of 3 x "
                f"{args.steps} steps",
                f"fsdp bf16: {cell(fsdp)}; ddp bf16 + channels_last: {cell(ddp)}",
                f"ddp fp32: {cell(fp32)}",
                f"fsdp/ddp {fsdp['images_per_s'] / ddp['images_per_s']:.2f}; "
                f"ddp bf16/fp32 {ddp['images_per_s'] / fp32['images_per_s']:.2f}",
            )
        if args.skip_embed:
            continue
        e = embed_throughput(name, args, device)
        print(
            f"embed {name:24s} forward {e['forward']:.0f} img/s, "
            f"channels_last {e['forward_channels_last']:.0f} img/s, "
            f"from JPEG bytes: 1 CPU thread {e['from_jpeg_1_thread']:.0f} img/s, "
            f"{os.cpu_count()} threads {e['from_jpeg_all_threads']:.0f} img/s",
            flush=True,
        )
        if not args.no_record:
            append_row(
                "bench_gpu.py",
                f"embed {name} 224px bf16 autocast, batch {args.batch}, in-process (Embedder.embed), "
                "median of 3",
                f"forward {e['forward']:.0f} img/s (channels_last {e['forward_channels_last']:.0f}); "
                f"from 320px JPEG bytes, decode on 1 CPU thread: {e['from_jpeg_1_thread']:.0f} img/s, "
                f"on {os.cpu_count()} threads: {e['from_jpeg_all_threads']:.0f} img/s",
                "forward without channels_last",
                f"channels_last x{e['forward_channels_last'] / e['forward']:.2f}; "
                f"decode-bound share {1 - e['from_jpeg_1_thread'] / e['forward_channels_last']:.2f}",
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
