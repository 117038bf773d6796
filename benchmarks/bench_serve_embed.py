"""Serving overhead of /v1/embed: throughput vs the same work in-process (search: bench_serve.py).

    .venv/bin/python benchmarks/bench_serve_embed.py [--model test_resnet] [--requests 600] [--repeats 3]
    .venv/bin/python benchmarks/bench_serve_embed.py --model resnet50 --image-size 224 --jpeg-size 320 \
        --images-per-request 8 --concurrency 8 --replica-cpus 2 --requests 100   # real size, on CPU
    python benchmarks/bench_serve_embed.py --model resnet50 --image-size 224 --jpeg-size 320 \
        --images-per-request 16 --replica-cpus 12 --batch-size 256 --requests 200   # a GPU machine

Measured in one run, on loopback, with a bounded asyncio httpx load generator (a fixed
request count, `--concurrency` in flight):
- /v1/embed images/s at saturation (--images-per-request per request, dynamic batching up
  to --batch-size) vs a bare in-process loop (decode on all CPU threads + preprocess +
  forward; on the GPU at bf16 when there is one) at the same batch size; and the same app
  with max_batch_size=1, for the gain of dynamic batching.
- /v1/search by vector (k=10, one request at a time) p50/p99 vs VectorIndex.search in
  process; the difference of the p50s is the serving overhead in ms. GET /v1/health, which
  the ingress answers itself, splits it: proxy + ingress against the hop to the retriever;
  and a one-route FastAPI app on the same Serve instance gives Ray Serve's own floor.
Medians of --repeats; rows are appended to benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from bench_decode import photo_like_jpegs  # benchmarks/ (scripts run by path)
from common import machine

ROOT = Path(__file__).resolve().parents[1]


async def load(url: str, path: str, bodies: list, concurrency: int) -> tuple[float, list[float]]:
    """POST every body once (GET for None), `concurrency` at a time; (seconds, per-request latencies).

    Any non-200 aborts."""
    import httpx

    queue = list(enumerate(bodies))
    latencies: list[float] = []

    async def worker(client):
        while queue:
            _, body = queue.pop()
            start = time.perf_counter()
            response = await (client.get(path) if body is None else client.post(path, json=body))
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def serve_floor(url: str, requests: int, repeats: int) -> list[list[float]]:
    """Latencies of GET on a one-route FastAPI app on the running Serve instance: Ray Serve's floor."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Floor:
        @api.get("/")
        async def ok(self) -> dict:
            return {"status": "ok"}

    serve.run(Floor.bind(), name="bench-floor", route_prefix="/bench-floor")
    pings = [None] * requests
    asyncio.run(load(url, "/bench-floor/", pings[:50], 1))
    runs = [asyncio.run(load(url, "/bench-floor/", pings, 1))[1] for _ in range(repeats)]
    serve.delete("bench-floor")
    return runs


def append_rows(rows: list[tuple]) -> None:
    with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
        for setup, ours, base, ratio in rows:
            f.write(
                f"| {date.today()} | bench_serve.py | {setup} | {ours} | {base} | {ratio} | {machine()} |\n"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--image-size", type=int, default=32, help="model input size (images are resized)")
    parser.add_argument("--requests", type=int, default=600, help="embed requests per measurement")
    parser.add_argument("--search-requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="embedder replica's threads")
    parser.add_argument("--jpeg-size", type=int, default=0, help="photo-like JPEGs, not digits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress: no proxy hop; gRPC)",
    )
    args = parser.parse_args()
    if args.throughput_optimized:  # read when Ray Serve is imported, here and in the cluster's processes
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"

    import pyarrow.parquet as pq
    import ray
    import torch

    from serve.control import serve_flags, start_app, stop_app
    from system import storage
    from system.data.dataset import digits_dataset
    from system.data.transforms import eval_transform, images_to_tensor, preprocessing_config
    from system.embed.batch import embed_images, embeddings_metadata, embeddings_table
    from system.index import build_index, open_index
    from system.models.artifact import Embedder, create_backbone, load_artifact, save_model

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    table = pq.read_table(storage.parquet_files(digits_dataset(str(work / "digits"))[0]))
    ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
    if args.jpeg_size:
        images = photo_like_jpegs(len(ids), args.jpeg_size)
    backbone = create_backbone(args.model, {})
    meta = {
        "timm_name": args.model,
        "timm_kwargs": {},
        "preprocessing": preprocessing_config(backbone, args.image_size),
    }
    meta = save_model(str(work / "model"), Embedder(backbone).eval(), meta)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_artifact(str(work / "model"), device)  # as a replica loads it
    pre = meta["preprocessing"]
    chunks = [images[i : i + 256] for i in range(0, len(images), 256)]
    vectors = np.concatenate([embed_images(model, pre, chunk, device) for chunk in chunks])
    (work / "emb").mkdir()
    pq.write_table(embeddings_table(ids, vectors, {}, embeddings_metadata(meta)), work / "emb" / "p.parquet")
    build_index(str(work / "emb"), str(work / "index"), progress=False)

    # Baseline 1: decode + preprocess + forward in this process, batch by batch.
    transform = eval_transform(meta["preprocessing"])
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    per_request = args.images_per_request
    sample = [images[i % len(images)] for i in range(args.requests * per_request)]

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            for i in range(0, len(sample), args.batch_size):
                batch = images_to_tensor(sample[i : i + args.batch_size], transform, threads)
                model.embed(torch.from_numpy(batch).to(device)).float().cpu()
        return len(sample) / (time.perf_counter() - start)

    serve_flags()  # the Ray Serve settings `repforge serve` starts its local Ray with
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    encoded = [base64.b64encode(d).decode() for d in sample]
    bodies = [{"images": encoded[i : i + per_request]} for i in range(0, len(encoded), per_request)]
    app = {
        "model": str(work / "model"),
        "index": str(work / "index"),
        "max_queued_requests": -1,
        "max_images": max(64, per_request),
        "replica_cpus": args.replica_cpus,
    }
    results = {}
    for batch in (args.batch_size, 1):
        url = start_app({**app, "max_batch_size": batch, "batch_wait_timeout_s": 0.005}, port=8123)
        asyncio.run(load(url, "/v1/embed", bodies[:64], args.concurrency))  # warm-up
        results[batch] = statistics.median(
            len(sample) / asyncio.run(load(url, "/v1/embed", bodies, args.concurrency))[0]
            for _ in range(args.repeats)
        )
        if batch == args.batch_size:
            queries = [
                {"vectors": [vectors[i % len(vectors)].tolist()], "k": 10}
                for i in range(args.search_requests)
            ]
            asyncio.run(load(url, "/v1/search", queries[:50], 1))
            served = [asyncio.run(load(url, "/v1/search", queries, 1))[1] for _ in range(args.repeats)]
            # The same path without the retriever: proxy -> ingress replica -> reply.
            pings = [None] * args.search_requests
            health = [asyncio.run(load(url, "/v1/health", pings, 1))[1] for _ in range(args.repeats)]
            floor = serve_floor(url, args.search_requests, args.repeats)
        stop_app()
    ray.shutdown()
    bare_rate = statistics.median(bare() for _ in range(args.repeats))

    index = open_index(str(work / "index"))
    local = []
    for _ in range(args.repeats):
        for i in range(args.search_requests):
            start = time.perf_counter()
            index.search(vectors[i % len(vectors)][None], 10)
            local.append(time.perf_counter() - start)
    lat = [x for run in served for x in run]
    p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
    l50, l99 = np.percentile(local, 50) * 1e3, np.percentile(local, 99) * 1e3
    h50 = np.percentile([x for run in health for x in run], 50) * 1e3
    f50 = np.percentile([x for run in floor for x in run], 50) * 1e3

    source = f" from {args.jpeg_size}px JPEG" if args.jpeg_size else ""
    mode = ", RAY_SERVE_THROUGHPUT_OPTIMIZED=1" if args.throughput_optimized else ""
    rows = [
        (
            f"/v1/embed {args.model} {args.image_size}px{source}, {per_request} img/req, "
            f"{args.concurrency} in flight, batch {args.batch_size}, replica {args.replica_cpus:g} CPUs"
            f"{', bf16' if device == 'cuda' else ''}{mode}",
            f"{results[args.batch_size]:.0f} img/s",
            f"{bare_rate:.0f} img/s in-process batch {args.batch_size}",
            f"{results[args.batch_size] / bare_rate:.2f}",
        ),
        (
            "/v1/embed dynamic batching gain",
            f"{results[args.batch_size]:.0f} img/s (batch {args.batch_size})",
            f"{results[1]:.0f} img/s (max_batch_size 1)",
            f"{results[args.batch_size] / results[1]:.2f}",
        ),
        (
            f"/v1/search by vector k=10, {len(ids)} items Flat, sequential{mode}",
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
            f"in-process p50 {l50:.3f} ms, p99 {l99:.3f} ms",
            f"overhead p50 {p50 - l50:.2f} ms",
        ),
        (
            f"/v1/search overhead split: GET /v1/health (proxy + ingress, no retriever), sequential{mode}",
            f"health p50 {h50:.2f} ms",
            f"search p50 {p50:.2f} ms",
            f"ingress -> retriever hop + search p50 {p50 - h50:.2f} ms",
        ),
        (
            f"Ray Serve's floor: GET on a one-route FastAPI app (proxy + replica), sequential{mode}",
            f"floor p50 {f50:.2f} ms",
            f"/v1/health p50 {h50:.2f} ms",
            f"our ingress (auth, timeout, metrics) p50 {h50 - f50:.2f} ms",
        ),
    ]
    for row in rows:
        print(" | ".join(row))
    append_rows(rows)


if __name__ == "__main__":
    main()
