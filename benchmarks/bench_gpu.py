"""Training and embedding throughput on one device, without Ray: the measurements gpu_suite.py runs.

    python benchmarks/gpu_suite.py            # the command (a GPU machine; writes RESULTS.md rows)
    python benchmarks/gpu_suite.py --dry-run  # every path on the CPU, tiny sizes, no rows

Written for GPU machines that have PyTorch but may lack Ray (its wheel is too large to
carry there): every piece measured is the project's own code, called without Ray around it.

Training: the module a `repforge pretrain` worker builds (system.train.module.build_model,
supervised objective, 224 px), system.train.optim's AdamW (fused on GPUs), torch.compile per
block as system.train.parallel.compile_blocks does it, and the step loop.py runs (bf16
autocast + channels_last under DDP; FSDP2's own bf16 policy), with the loss kept on the
device; one-rank process group. Images are synthetic and already on the device, so the
input pipeline is not part of the number. Reported: images/s (median of 3 windows), model
FLOPs utilisation (the FLOPs of one step counted by torch.utils.flop_counter, over the GPU's
dense bf16 peak) and peak memory.

Embedding: Embedder.embed under bf16 autocast on a device-resident batch (forward only),
against the same model from encoded JPEG bytes: decoded on the device
(system.data.device_decode, nvJPEG on a GPU) and decoded by PIL on every CPU thread (the
path before it).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from bench_decode import photo_like_jpegs  # benchmarks/ (scripts run by path)

# Dense bf16 tensor-core peak (no sparsity), from the vendors' data sheets; the first match wins.
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


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
    from torch.utils.flop_counter import FlopCounterMode

    small = {k: v[:4] for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        loss, _ = module(small)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 4


def train_throughput(
    model_name: str, strategy: str, compiled: bool, batch: int, steps: int, device, size=224, repeats=3
) -> dict:
    """One training configuration's images/s, MFU and peak memory (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel

    from system.config import build_config
    from system.train.module import build_model, train_mode
    from system.train.optim import build_optimizer
    from system.train.parallel import apply_fsdp, compile_blocks
    from system.train.progress import mean_loss

    cuda = device.type == "cuda"
    train = {"strategy": strategy, "batch_size": batch, "compile": compiled if cuda else None}
    kwargs = {"img_size": size} if "vit" in model_name else {}  # timm ViTs take one input size
    model = {"name": model_name, "kwargs": kwargs}
    cfg = build_config({"model": model, "objective": {"name": "supervised"}, "train": train})
    torch.manual_seed(0)
    module = build_model(cfg, "pretrain", 1000).to(device)
    images = {
        "image": torch.randn(batch, 3, size, size, device=device),
        "label": torch.randint(0, 1000, (batch,), device=device),
    }
    flops = training_flops_per_image(module, images)
    if strategy == "fsdp":
        model = apply_fsdp(module, cfg.train, device)  # compiles the blocks itself, before sharding
        autocast = False  # FSDP2's MixedPrecisionPolicy casts the parameters itself
    else:
        if cuda:
            module = module.to(memory_format=torch.channels_last)  # as loop.py does under DDP
        compile_blocks(module, cfg.train, device)
        model = DistributedDataParallel(module, device_ids=[device.index] if cuda else None)
        autocast = cuda
    train_mode(module)
    optimizer = build_optimizer(module, cfg.train)
    losses: list[torch.Tensor] = []

    def run(count: int) -> None:
        for _ in range(count):
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                loss, _ = model(images)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())  # as loop.py keeps it: no host sync per step

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(min(3, repeats))  # warm-up: compilation, cuDNN autotuning, the allocator, FSDP's all-gathers
    sync(device)
    warmup_s = time.perf_counter() - start
    rate = median_rate(lambda: run(steps), batch * steps, repeats, device)
    peak = peak_flops(device)
    return {
        "images_per_s": rate,
        "gflops_per_image": flops / 1e9,
        "mfu": rate * flops / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
        "warmup_s": warmup_s,
        "loss": mean_loss(losses),
    }


@torch.inference_mode()
def embed_throughput(
    model_name: str, batch: int, images: int, jpeg_size: int, device, size=None, repeats=3
) -> dict:
    """Forward only vs from JPEG bytes (decoded on the device, and by PIL on every CPU thread)."""
    from system.data.device_decode import images_to_device
    from system.data.transforms import eval_transform, preprocessing_config
    from system.models.artifact import Embedder, create_backbone

    torch.manual_seed(0)
    backbone = create_backbone(model_name)
    pre = preprocessing_config(backbone, size)
    transform = eval_transform(pre)
    cuda = device.type == "cuda"
    model = Embedder(backbone).to(device).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)  # as the embedding actors run it
    resident = torch.randn(batch, 3, pre["size"], pre["size"], device=device)
    jpegs = photo_like_jpegs(images, jpeg_size)
    chunks = [jpegs[i : i + batch] for i in range(0, len(jpegs), batch)]
    threads = os.cpu_count() or 1

    def forward(x) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            model.embed(x).float()

    def forward_only() -> None:
        for _ in chunks:
            forward(resident)

    def from_bytes(gpu_decode: bool) -> None:
        for chunk in chunks:
            forward(images_to_device(chunk, transform, device, threads, gpu_decode))

    def decode_only() -> None:
        for chunk in chunks:
            images_to_device(chunk, transform, device, threads, True)

    rates = {}
    for name, run in (
        ("forward", forward_only),
        ("decode_on_device", decode_only),
        ("from_jpeg_device_decode", lambda: from_bytes(True)),
        ("from_jpeg_cpu_decode", lambda: from_bytes(False)),
    ):
        run()  # warm-up (nvJPEG's handles, cuDNN autotuning)
        items = len(chunks) * batch if name == "forward" else len(jpegs)
        rates[name] = median_rate(run, items, repeats, device)
    return {**rates, "cpu_threads": threads, "size": pre["size"]}


@torch.inference_mode()
def train_input_throughput(batch: int, images: int, jpeg_size: int, device, size=224, repeats=3) -> dict:
    """train.gpu_decode's input: device_batch's eval batches and SSL view pairs, images/s."""
    from system.data.device_decode import device_batch

    pre = {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.95}
    jpegs = photo_like_jpegs(images, jpeg_size)
    chunks = [jpegs[i : i + batch] for i in range(0, len(jpegs), batch)]
    rates = {}
    for mode in ("eval", "ssl"):

        def run(mode=mode) -> None:
            for chunk in chunks:
                ids = [str(i) for i in range(len(chunk))]
                device_batch({"image": chunk, "id": ids}, pre, mode, True, 0, device)

        run()
        rates[mode] = median_rate(run, len(jpegs), repeats, device)
    return rates


def start_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, rank=0, world_size=1, device_id=device if device.type == "cuda" else None
    )
