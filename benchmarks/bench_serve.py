"""/v1/search by vector through Ray Serve vs a bare FastAPI + uvicorn process with FAISS in-process,
and the effect of each Ray Serve setting on its own (embedding: bench_serve_embed.py).

    .venv/bin/python benchmarks/bench_serve.py              # every setup below, ~2 min each on 2 CPUs
    .venv/bin/python benchmarks/bench_serve.py --setups hop ingress haproxy --requests 300

The baseline is what users write instead (clip-retrieval's back end is such an app): one
uvicorn process, the same index opened with system.index.open_index, the same JSON answer
(hits with metadata). Each setup runs in its own process with its own local Ray instance,
since Ray Serve reads its settings (environment variables) when its processes start:

    hop         search in the retriever deployment: ingress -> retriever hop (ingress_search=off)
    ingress     search inside the ingress replica, batched (ingress_search=on): no hop
    grpc        hop, with RAY_SERVE_USE_GRPC_BY_DEFAULT=1 (gRPC between deployments)
    ongoing5    hop, the retriever at Ray's default max_ongoing_requests=5 (repforge sets 64)
    throughput  ingress, with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (user code + router on one loop, ...)
    haproxy     ingress, with RAY_SERVE_ENABLE_HA_PROXY=1 (HAProxy, direct ingress to replicas)
    userloop    haproxy, with RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 (user code on the
                replica's own event loop: no thread hop per request; one of throughput's settings)
    quiet       haproxy, with Serve's per-request access log off (app arg access_log=false)
    all         quiet, with throughput-optimized too
    floor       not repforge: the bare handler inside one Serve replica behind HAProxy, i.e.
                Ray Serve's own floor for this request (what repforge's routes add is above it)

Measured by one asyncio httpx client in this process against each server in turn, on
loopback, bounded request counts: p50/p99 of --requests sequential requests (1 client),
requests/s with --clients in flight. Each setup's ratio is against the bare process measured
right before it (it stays up); rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import append_row  # benchmarks/ (scripts run by path)
from fastapi import Request  # at module level: FastAPI resolves the bare handler's annotation here

ROOT = Path(__file__).resolve().parents[1]
# setup -> (Ray Serve environment flags, app arguments)
SETUPS = {
    "hop": ({}, {"ingress_search": "off"}),
    "ingress": ({}, {"ingress_search": "on"}),
    "grpc": ({"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}, {"ingress_search": "off"}),
    "ongoing5": ({}, {"ingress_search": "off", "max_ongoing_requests": 5}),
    "throughput": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, {"ingress_search": "on"}),
    "haproxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, {"ingress_search": "on"}),
    "userloop": (
        {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
        {"ingress_search": "on"},
    ),
    "quiet": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, {"ingress_search": "on", "access_log": False}),
    "all": (
        {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
        {"ingress_search": "on", "access_log": False},
    ),
    "floor": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, {"floor": True}),
}
# Every Ray Serve variable some setup sets: each server starts with none of them but its own.
SERVE_FLAGS = {name for flags, _ in SETUPS.values() for name in flags}


async def load(url: str, bodies: list, clients: int) -> tuple[float, list[float]]:
    """POST every body to /v1/search once, `clients` at a time: (seconds, latencies). Any non-200 aborts."""
    import httpx

    queue = list(bodies)
    latencies: list[float] = []
    dropped: list[int] = []

    async def worker(client):
        while queue:
            body = queue.pop()
            start = time.perf_counter()
            try:
                response = await client.post("/v1/search", json=body)
            except httpx.TransportError:  # a connection dropped under load: counted, sent again
                dropped.append(1)
                response = await client.post("/v1/search", json=body)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"/v1/search: {response.status_code} {response.text[:200]}")

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as c:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        if dropped:
            print(f"{len(dropped)} dropped connections, sent again", flush=True)
        return time.perf_counter() - start, latencies


def measure(url: str, vectors: np.ndarray, requests: int, clients: int) -> dict:
    bodies = [{"vectors": [vectors[i % len(vectors)].tolist()], "k": 10} for i in range(requests)]
    asyncio.run(load(url, bodies[:50], 4))  # warm-up: connections, caches, the index copy
    _, latencies = asyncio.run(load(url, bodies, 1))
    seconds, _ = asyncio.run(load(url, bodies * 2, clients))
    return {
        "p50": float(np.percentile(latencies, 50) * 1e3),
        "p99": float(np.percentile(latencies, 99) * 1e3),
        "rps": 2 * requests / seconds,
    }


# -- the servers (each its own process) -------------------------------------------------


def bare_answer(index, body: dict) -> dict:
    from serve.search import hits

    vectors = np.asarray(body["vectors"], np.float32)
    return {"results": hits(index, *index.search(vectors, int(body.get("k", 10))))}


def bare_server(index_uri: str, port: int) -> None:
    """FastAPI + uvicorn, the index searched in the request handler: what users write instead."""
    import uvicorn
    from fastapi import FastAPI

    from system.index import open_index

    index = open_index(index_uri)
    api = FastAPI()

    @api.post("/v1/search")
    async def search(request: Request) -> dict:
        return bare_answer(index, await request.json())

    print(f"URL http://127.0.0.1:{port}", flush=True)
    # Keep-alive as long as Serve's proxy keeps it (90 s): idle connections stay open for the client.
    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=90)


def floor_app(index_uri: str):
    """The bare handler inside one Ray Serve replica: what Serve itself costs per request."""
    from fastapi import FastAPI
    from ray import serve

    from system.index import open_index

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Floor:
        def __init__(self):
            self.index = open_index(index_uri)

        async def search(self, request: Request) -> dict:
            return bare_answer(self.index, await request.json())

        # The class travels to the replica by value, with only the globals its code names: the
        # annotation (a string here) would not resolve there, so it is given as the class itself.
        search.__annotations__ = {"request": Request, "return": dict}
        api.post("/v1/search")(search)

    return Floor.bind()


def serve_server(work: str, port: int, app_args: str) -> None:
    import ray
    from ray import serve

    from serve.control import start_app, stop_app

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    args = {"model": f"{work}/model", "index": f"{work}/index", **json.loads(app_args)}
    floor = args.pop("floor", False)
    if floor:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(floor_app(args["index"]), name="floor", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
    else:
        url = start_app({**args, "max_queued_requests": -1}, port=port, timeout_s=900)  # a loaded machine
    print(f"URL {url}", flush=True)
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    while not stopped:
        time.sleep(0.2)
    if floor:
        serve.shutdown()
    else:
        stop_app()
    ray.shutdown()


def start_server(argv: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    deadline = time.monotonic() + 900
    for line in proc.stdout:
        if line.startswith("URL "):
            return proc, line.split()[1]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"server {argv} did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- the run ---------------------------------------------------------------------------------


def build(work: Path, model_name: str) -> np.ndarray:
    """Digits, a random-init timm model, its embeddings and a Flat index; returns the vectors."""
    import pyarrow.parquet as pq

    from system import storage
    from system.data.dataset import digits_dataset
    from system.data.transforms import preprocessing_config
    from system.embed.batch import embed_images, embeddings_metadata, embeddings_table
    from system.index import build_index
    from system.models.artifact import Embedder, create_backbone, save_model

    table = pq.read_table(storage.parquet_files(digits_dataset(str(work / "digits"))[1]))
    backbone = create_backbone(model_name, {})
    meta = {"timm_name": model_name, "timm_kwargs": {}, "preprocessing": preprocessing_config(backbone, 32)}
    model = Embedder(backbone).eval()
    meta = save_model(str(work / "model"), model, meta)
    vectors = embed_images(model, meta["preprocessing"], table.column("image").to_pylist())
    passthrough = {"label": table.column("label")}
    emb = embeddings_table(table.column("id").to_pylist(), vectors, passthrough, embeddings_metadata(meta))
    (work / "emb").mkdir()
    pq.write_table(emb, work / "emb" / "p.parquet")
    build_index(str(work / "emb"), str(work / "index"), factory="Flat", progress=False)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--requests", type=int, default=400, help="sequential requests per setup")
    parser.add_argument("--clients", type=int, default=32, help="requests in flight for req/s")
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    vectors = build(work, args.model)
    clean = {k: v for k, v in os.environ.items() if k not in SERVE_FLAGS}
    # The bare process stays up; it is measured again right before each setup, so a row's ratio
    # compares two measurements minutes apart at most (this machine's load moves).
    bare_proc, bare_url = start_server(["--bare", str(work / "index"), str(args.port + 1)], clean)
    try:
        for name in args.setups:
            flags, app_args = SETUPS[name]
            proc, url = start_server(
                ["--serve", str(work), str(args.port), json.dumps(app_args)], {**clean, **flags}
            )
            try:
                bare = measure(bare_url, vectors, args.requests, args.clients)
                ours = measure(url, vectors, args.requests, args.clients)
            finally:
                stop_server(proc)
            print(f"{name}: {json.dumps(ours)}; bare: {json.dumps(bare)}", flush=True)
            record(name, flags, app_args, len(vectors), args, ours, bare)
    finally:
        stop_server(bare_proc)


def record(name: str, flags: dict, app_args: dict, items: int, args, ours: dict, bare: dict) -> None:
    setting = ", ".join([*(f"{k}={v}" for k, v in app_args.items()), *(f"{k}={v}" for k, v in flags.items())])
    append_row(
        "bench_serve.py",
        f"/v1/search by vector k=10, {items} items Flat, setup `{name}` "
        f"({setting}; Ray defaults otherwise); 1 client x {args.requests} requests, "
        f"then {args.clients} clients x {2 * args.requests}; bare measured just before",
        f"p50 {ours['p50']:.2f} ms, p99 {ours['p99']:.2f} ms, {ours['rps']:.0f} req/s",
        f"bare FastAPI+uvicorn+FAISS: p50 {bare['p50']:.2f} ms, p99 {bare['p99']:.2f} ms, "
        f"{bare['rps']:.0f} req/s",
        f"p50 x{ours['p50'] / bare['p50']:.2f}, throughput x{ours['rps'] / bare['rps']:.2f}",
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        bare_server(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_server(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
