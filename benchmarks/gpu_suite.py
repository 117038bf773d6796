r"""Every GPU measurement of the project in one command, within 8 minutes on one GPU.

    python benchmarks/gpu_suite.py              # a GPU machine: measures, appends rows to RESULTS.md
    python benchmarks/gpu_suite.py --dry-run    # every path on the CPU with tiny sizes, no rows (< 60 s)
    python benchmarks/gpu_suite.py --only embed train --budget-s 300

Measured, each against a baseline from the same run (benchmarks/bench_gpu.py has the details):
- embed: resnet50 at 224 px from 320 px JPEG bytes, decoded on the GPU (system.data.device_decode)
  vs the forward alone on a GPU-resident batch (goal: >= 50%), and vs PIL on every CPU thread;
  train.gpu_decode's input (eval batches, SSL view pairs decoded and augmented on the GPU);
- train: images/s and MFU of resnet50, ViT-S/16 and ViT-B/16 at 224 px, bf16, compiled, under
  DDP and FSDP2 (one-rank group; goals: MFU >= 35% for the ViTs, FSDP2 >= 0.9x DDP), and DDP
  without torch.compile;
- faiss: each `--factory auto` candidate's build and search (200k x 256, 10k queries, k=10,
  recall@10 against exact) on the CPU vs the GPU (k-means on the GPU as `repforge index build`
  runs it; search through index_cpu_to_gpu where FAISS has a GPU index of that kind);
- serve: /v1/embed images/s over HTTP on loopback (Ray Serve, GPU replica) vs embed_images in-process.

On a development session's GPU machine (the device tool: PyTorch, timm and peft there; no Ray,
FAISS or pydantic), pydantic travels as wheels and the rows come back in a file of their own:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0
    run(carry=[".whl"], timeout_s=560, command="python3 -m pip install -q --no-index --no-deps
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1;
        python3 benchmarks/gpu_suite.py --results $OUT/rows.md 2>&1 | tee $OUT/suite.log")
    cat <files_at>/rows.md >> benchmarks/RESULTS.md

It checks its dependencies first: a GPU machine may lack Ray or FAISS (the development GPU
machines have neither, and pydantic must travel as a wheel). Then it runs what it can and
prints what it skipped and why, and stops starting measurements that would overrun
--budget-s. A measurement that fails prints its error and the suite goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu, common: run by path
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the project, without an install

SECTIONS = ("embed", "train", "faiss", "serve")
NEEDS = {  # section -> modules it imports
    "embed": ["torch", "torchvision", "timm", "PIL", "safetensors", "pyarrow"],
    "train": ["torch", "timm", "pydantic", "yaml", "safetensors", "pyarrow"],
    "faiss": ["faiss", "numpy", "pyarrow"],
    "serve": ["ray", "ray.serve", "fastapi", "httpx", "pydantic", "safetensors", "torchvision"],
}


@dataclass
class Sizes:
    """What each measurement runs on: the real sizes, or tiny ones for --dry-run."""

    embed_model: str = "resnet50"
    embed_size: int | None = None  # None: the model's own (224)
    jpeg: int = 320
    batch: int = 256
    images: int = 1024
    input_images: int = 512
    train_models: tuple = ("resnet50", "vit_small_patch16_224", "vit_base_patch16_224")
    train_batch: int = 256
    train_steps: int = 10
    eager_baseline: tuple = ("resnet50",)  # the compile gain, measured once
    faiss_data: tuple = (200_000, 256)  # vectors, dim: every `--factory auto` candidate builds on them
    queries: int = 10_000
    serve_requests: int = 96
    serve_per_request: int = 16
    serve_concurrency: int = 16
    train_size: int = 224
    repeats: int = 3  # timed windows per measurement (the median is reported)
    # Seconds each measurement is expected to take on one H100/H200 (compilation included).
    cost: dict = field(
        default_factory=lambda: {"embed": 40, "train": 45, "faiss": 25, "serve": 60, "input": 15}
    )


DRY = Sizes(
    embed_model="test_resnet",
    embed_size=32,
    jpeg=48,
    batch=8,
    images=8,
    input_images=8,
    train_models=("test_resnet", "test_vit"),
    train_size=32,
    train_batch=4,
    train_steps=1,
    eager_baseline=("test_resnet",),
    faiss_data=(2_000, 32),
    queries=100,
    serve_requests=4,
    serve_per_request=2,
    serve_concurrency=2,
    repeats=1,
    cost={"embed": 3, "train": 3, "faiss": 2, "serve": 25, "input": 2},
)


def check_deps() -> dict[str, str | None]:
    """Module -> its version (or "ok"), None when it does not import."""
    found = {}
    for name in sorted({m for mods in NEEDS.values() for m in mods}):
        try:
            module = importlib.import_module(name)
            found[name] = str(getattr(module, "__version__", "ok"))
        except Exception:  # a broken install is as missing as an absent one
            found[name] = None
    return found


class Suite:
    """Runs the sections in order within the budget; keeps the rows and what was skipped."""

    def __init__(self, args, sizes: Sizes, device):
        self.args, self.sizes, self.device = args, sizes, device
        self.start = time.monotonic()
        self.rows: list[tuple] = []
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def attempt(self, what: str, cost_key: str, run) -> object:
        """run() unless it would overrun the budget; its error is printed, not raised."""
        cost = self.sizes.cost[cost_key]
        if cost > self.left() and not self.args.dry_run:  # a dry run runs every path
            self.skipped.append(f"{what}: needs ~{cost} s, {max(0, self.left()):.0f} s of the budget left")
            return None
        began = time.monotonic()
        try:
            result = run()
        except Exception as err:
            traceback.print_exc(limit=3)
            self.skipped.append(f"{what}: failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
            return None
        print(f"  [{what}: {time.monotonic() - began:.0f} s]", flush=True)
        return result

    def row(self, setup: str, ours: str, baseline: str, ratio: str) -> None:
        print(f"ROW | {setup} | {ours} | {baseline} | {ratio}", flush=True)
        self.rows.append(("gpu_suite.py", setup, ours, baseline, ratio))


def run_embed(suite: Suite) -> None:
    from bench_gpu import embed_throughput, train_input_throughput

    s, device = suite.sizes, suite.device
    e = suite.attempt(
        "embed",
        "embed",
        lambda: embed_throughput(s.embed_model, s.batch, s.images, s.jpeg, device, s.embed_size, s.repeats),
    )
    if e:
        ours = e["from_jpeg_device_decode"]
        suite.row(
            f"embed {s.embed_model} {e['size']}px bf16 from {s.jpeg}px JPEG bytes, batch {s.batch}, "
            f"{s.images} images, in-process (embed actor path), median of {s.repeats}",
            f"decoded on the {device.type.upper()}: {ours:.0f} img/s "
            f"(decode alone {e['decode_on_device']:.0f})",
            f"forward only {e['forward']:.0f} img/s; PIL on {e['cpu_threads']} CPU threads "
            f"{e['from_jpeg_cpu_decode']:.0f} img/s",
            f"x{ours / e['forward']:.2f} of forward (goal 0.5); x{ours / e['from_jpeg_cpu_decode']:.2f} "
            "over CPU decoding",
        )
    size = s.embed_size or 224
    r = suite.attempt(
        "train input",
        "input",
        lambda: train_input_throughput(s.batch, s.input_images, s.jpeg, device, size, s.repeats),
    )
    if r:
        suite.row(
            f"train.gpu_decode input: {s.jpeg}px JPEG -> {size}px on the {device.type.upper()}, "
            f"batch {s.batch} (device_batch)",
            f"eval batches {r['eval']:.0f} img/s; SSL view pairs {r['ssl']:.0f} img/s",
            "-",
            "-",
        )


def run_train(suite: Suite) -> None:
    from bench_gpu import start_process_group, train_throughput

    s, device = suite.sizes, suite.device
    start_process_group(device)
    compiled = device.type == "cuda"
    for name in s.train_models:
        results = {}
        variants = [("ddp", compiled), ("fsdp", compiled)]
        variants += [("ddp", False)] if compiled and name in s.eager_baseline else []
        for strategy, comp in variants:
            label = f"{strategy}{' compiled' if comp else ''}"
            r = suite.attempt(
                f"train {name} {label}",
                "train",
                lambda n=name, st=strategy, c=comp: train_throughput(
                    n, st, c, s.train_batch, s.train_steps, device, s.train_size, s.repeats
                ),
            )
            if r:
                results[label] = r
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                print(
                    f"train {name:22s} {label:14s} {r['images_per_s']:7.0f} img/s  MFU {mfu:>6s}  "
                    f"{r['gflops_per_image']:.1f} GFLOP/img  peak {r['peak_memory_gb']:.1f} GiB  "
                    f"warm-up {r['warmup_s']:.0f} s",
                    flush=True,
                )
            if device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
        if results:
            suite.row(*train_row(name, results, s))


def train_row(name: str, results: dict, s: Sizes) -> tuple[str, str, str, str]:
    def cell(label: str) -> str:
        r = results.get(label)
        if r is None:
            return f"{label}: not run"
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        return f"{label}: {r['images_per_s']:.0f} img/s{mfu}, {r['peak_memory_gb']:.1f} GiB"

    labels = list(results)
    fsdp = next((results[k] for k in labels if k.startswith("fsdp")), None)
    ddp = next((results[k] for k in labels if k.startswith("ddp") and k != "ddp"), results.get("ddp"))
    eager = results.get("ddp")
    ratios = []
    if fsdp and ddp:
        ratios.append(f"fsdp/ddp {fsdp['images_per_s'] / ddp['images_per_s']:.2f} (goal 0.9)")
    if eager and ddp and ddp is not eager:
        ratios.append(f"compile x{ddp['images_per_s'] / eager['images_per_s']:.2f}")
    gflops = next(iter(results.values()))["gflops_per_image"]
    setup = (
        f"train {name} supervised, batch {s.train_batch}, bf16 (autocast / FSDP2 policy), fused AdamW, "
        f"1 GPU (1-rank group), synthetic images on the device, {gflops:.1f} GFLOP/img fwd+bwd, "
        f"median of {s.repeats} x {s.train_steps} steps"
    )
    main = [cell(k) for k in labels if k != "ddp"]
    return setup, "; ".join(main), cell("ddp") if eager else "-", "; ".join(ratios) or "-"


def run_faiss(suite: Suite) -> None:
    import faiss
    from bench_faiss_gpu import faiss_case  # benchmarks/

    gpus = faiss.get_num_gpus()
    if suite.args.dry_run:  # OpenMP's spinning threads crawl on a small, shared CPU
        faiss.omp_set_num_threads(1)
    if not gpus:
        suite.skipped.append("faiss GPU side: this FAISS sees no GPU (a CPU-only wheel, or no GPU here)")
    from system.index.auto import CANDIDATES

    count, dim = suite.sizes.faiss_data
    for name in CANDIDATES:
        run = lambda n=name: faiss_case(n, count, dim, suite.sizes.queries, gpus)  # noqa: E731
        r = suite.attempt(f"faiss {name}", "faiss", run)
        if r:
            suite.row(*r)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def post_all(url: str, bodies: list, clients: int) -> float:
    """POST every body once, `clients` at a time; the seconds it took. A non-200 aborts."""
    import httpx

    queue = list(bodies)

    async def client_loop(client) -> None:
        while queue:
            response = await client.post(url, json=queue.pop())
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")

    async with httpx.AsyncClient(timeout=120.0, limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - start


def serve_rates(s: Sizes, device) -> dict:
    """/v1/embed over HTTP vs embed_images in-process, on the same model and JPEGs."""
    import ray
    import torch
    from bench_decode import photo_like_jpegs

    from serve.control import serve_flags, start_app, stop_app
    from system.data.transforms import preprocessing_config
    from system.embed.batch import embed_images
    from system.models.artifact import Embedder, create_backbone, load_artifact, save_model

    work = Path(tempfile.mkdtemp(prefix="gpu-suite-serve-"))
    backbone = create_backbone(s.embed_model, {})
    pre = preprocessing_config(backbone, s.embed_size)
    meta = {"timm_name": s.embed_model, "timm_kwargs": {}, "preprocessing": pre}
    save_model(str(work / "model"), Embedder(backbone).eval(), meta)
    jpegs = photo_like_jpegs(s.serve_requests * s.serve_per_request, s.jpeg)
    model, _ = load_artifact(str(work / "model"), device.type)

    def in_process() -> None:
        for i in range(0, len(jpegs), s.batch):
            embed_images(model, pre, jpegs[i : i + s.batch], device.type)

    in_process()
    start = time.perf_counter()
    in_process()
    baseline = len(jpegs) / (time.perf_counter() - start)
    model = None  # the replica loads its own copy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    started = not ray.is_initialized()
    if started:  # a new instance of its own, with the app's Serve settings, its files apart from
        # /tmp/ray, where Ray Train finds "the" cluster of a test session running beside it
        serve_flags()
        ray_dir = tempfile.mkdtemp(prefix="ray-suite-")
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=ray_dir,
        )
    cpus = max(1, (os.cpu_count() or 2) // 2)  # the ingress and the other deployments need some
    app = {"model": str(work / "model"), "max_batch_size": s.batch, "batch_wait_timeout_s": 0.005}
    app.update(max_queued_requests=-1, max_images=max(64, s.serve_per_request), replica_cpus=cpus)
    try:
        url = start_app(app, port=free_port())
        encoded = [base64.b64encode(d).decode() for d in jpegs]
        per = s.serve_per_request
        bodies = [{"images": encoded[i : i + per]} for i in range(0, len(encoded), per)]
        asyncio.run(
            post_all(url + "/v1/embed", bodies[: s.serve_concurrency], s.serve_concurrency)
        )  # warm-up
        seconds = asyncio.run(post_all(url + "/v1/embed", bodies, s.serve_concurrency))
    finally:
        stop_app()
        if started:
            ray.shutdown()
    return {"served": len(jpegs) / seconds, "in_process": baseline, "replica_cpus": cpus}


def run_serve(suite: Suite) -> None:
    s = suite.sizes
    r = suite.attempt("serve /v1/embed", "serve", lambda: serve_rates(s, suite.device))
    if r:
        suite.row(
            f"/v1/embed {s.embed_model} {s.embed_size or 224}px from {s.jpeg}px JPEG, {s.serve_per_request} "
            f"img/req, {s.serve_concurrency} in flight, batch {s.batch}, replica {r['replica_cpus']} CPUs + "
            f"{'1 GPU, JPEGs decoded on it' if suite.device.type == 'cuda' else 'no GPU'}",
            f"{r['served']:.0f} img/s",
            f"{r['in_process']:.0f} img/s embed_images in-process, batch {s.batch}",
            f"{r['served'] / r['in_process']:.2f}",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every path on the CPU, tiny sizes, no rows")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting measurements after this")
    parser.add_argument("--results", default=None, help="append rows here (default benchmarks/RESULTS.md)")
    args = parser.parse_args()
    args.budget_s = args.budget_s or (55.0 if args.dry_run else 470.0)
    deps = check_deps()
    print("dependencies: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in deps.items()), flush=True)
    if deps.get("torch") is None:
        print("gpu_suite: torch does not import; nothing measured")
        return 1
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_suite: no GPU here, nothing measured (--dry-run runs every path on the CPU)")
        return 0
    device = torch.device("cuda", 0) if cuda and not args.dry_run else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}", flush=True)
    suite = Suite(args, DRY if args.dry_run else Sizes(), device)
    runners = {"embed": run_embed, "train": run_train, "faiss": run_faiss, "serve": run_serve}
    for section in args.only:
        missing = [m for m in NEEDS[section] if deps.get(m) is None]
        if missing:
            suite.skipped.append(f"{section}: skipped, missing {', '.join(missing)}")
            continue
        print(f"== {section} ({suite.left():.0f} s of the budget left)", flush=True)
        runners[section](suite)
    print(f"done in {time.monotonic() - suite.start:.0f} s; {len(suite.rows)} rows", flush=True)
    for line in suite.skipped:
        print(f"NOT MEASURED: {line}", flush=True)
    if args.dry_run or device.type != "cuda":
        print("dry run: no rows written", flush=True)
        return 0
    import common

    if args.results:
        common.RESULTS = Path(args.results)
    for row in suite.rows:
        common.append_row(*row)
    print(f"appended {len(suite.rows)} rows to {common.RESULTS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
