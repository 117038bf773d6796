"""`repforge quickstart`: every stage, for real, on scikit-learn's bundled digits.

ingest -> pretrain (SimCLR) -> finetune (LoRA) -> 2-trial sweep -> embed -> index ->
serve, one real HTTP request per endpoint, a summary table, then the app is shut down
(`--keep-serving` leaves it up). Runs in a few minutes on 2 CPU cores; writes under
`{storage}/quickstart/` (deploy.yaml points at the default `runs/quickstart/`).

    repforge quickstart
    .venv/bin/python -m pytest -q tests/test_quickstart.py
"""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path

from system import storage
from system.config import load_config

PRESET = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _stage(starts: list[tuple[str, float]], name: str) -> None:
    """Prints a stage header and notes in `starts` when it began (the summary lists each stage's seconds)."""
    starts.append((name.split(":")[0], time.perf_counter()))
    print(f"\n=== {name} ===", flush=True)


def _stage_seconds(starts: list[tuple[str, float]], end: float) -> list[tuple[str, str]]:
    ends = [start for _, start in starts[1:]] + [end]
    return [(f"time {name}", f"{stop - start:.0f} s") for (name, start), stop in zip(starts, ends)]


def _request(client, method: str, path: str, **kwargs) -> tuple[dict, float]:
    start = time.perf_counter()
    response = client.request(method, path, **kwargs)
    elapsed_ms = 1000 * (time.perf_counter() - start)
    response.raise_for_status()
    return response.json(), elapsed_ms


def probe_endpoints(url: str, image: bytes, query_id: str) -> dict[str, float]:
    """One real request per endpoint; returns latency in ms per endpoint (raises on any error)."""
    import httpx

    latencies = {}
    payload = {"images": [base64.b64encode(image).decode()]}
    with httpx.Client(base_url=url, timeout=60.0) as client:
        _, latencies["GET /v1/health"] = _request(client, "GET", "/v1/health")
        body, latencies["POST /v1/embed"] = _request(client, "POST", "/v1/embed", json=payload)
        assert len(body["embeddings"]) == 1
        body, latencies["POST /v1/classify"] = _request(client, "POST", "/v1/classify?k=3", json=payload)
        assert len(body["predictions"][0]) == 3
        body, latencies["POST /v1/search"] = _request(client, "POST", "/v1/search?k=5", json=payload)
        assert len(body["results"][0]) == 5
        body, _ = _request(client, "POST", "/v1/search?k=1", json={"ids": [query_id]})
        assert body["results"][0][0]["id"] == query_id
    return latencies


def print_summary(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print("\n" + "-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 24), flush=True)


def run_quickstart(
    storage_root: str = "runs", port: int = 8000, keep_serving: bool = False, overrides: list[str] = ()
) -> str:
    import pyarrow.parquet as pq

    from serve.control import start_app, stop_app
    from system.data.dataset import digits_dataset
    from system.embed.batch import run_embed
    from system.index import build_index, evaluate_index
    from system.models.artifact import read_meta
    from system.ray_env import ensure_ray
    from system.train import run_training
    from tune.sweep import run_sweep

    started = time.perf_counter()
    stages: list[tuple[str, float]] = []
    root = storage.normalize(storage_root)
    base = storage.join(root, "quickstart")
    common = [f"run.storage={root}", *overrides]
    load_config(PRESET, common)  # a bad --set fails here, before anything runs
    # A fresh run each time: Ray Train would otherwise resume the previous quickstart's runs.
    for stale in (storage.join(root, "_ray", "quickstart"), base):
        shutil.rmtree(storage.local_path(stale), ignore_errors=True)

    _stage(stages, "data: scikit-learn digits -> canonical Parquet")
    train_uri, test_uri = digits_dataset(storage.join(root, "datasets", "digits"))
    data = [f"data.train={train_uri}", f"data.val={test_uri}"]
    ensure_ray()

    _stage(stages, "pretrain: SimCLR, 2 workers, DDP")
    pretrained = run_training(
        load_config(PRESET, [*data, *common, "run.name=quickstart/pretrain"]), "pretrain"
    )

    _stage(stages, "finetune: LoRA + linear head")
    ft = [*data, *common, f"model.init={pretrained['model']}", "objective.name=supervised"]
    finetuned = run_training(load_config(PRESET, [*ft, "run.name=quickstart/finetune"]), "finetune")

    _stage(stages, "sweep: 2 trials, ASHA over lr and LoRA rank")
    # Shorter trials that report every epoch (11 steps), so ASHA can stop the weaker one
    # early. One at a time: two side by side starve each other's input pipeline on 2 CPUs.
    trial = ["train.epochs=2", "train.eval_every=11", "run.name=quickstart/sweep"]
    sweep_uri = run_sweep(load_config(PRESET, [*ft, *trial]), job="finetune")

    _stage(stages, "embed: Ray Data actor pool")
    model_uri = finetuned["model"]
    embeddings = run_embed(model_uri, train_uri, storage.join(base, "embeddings"), overwrite=True)

    _stage(stages, "index: exact FAISS")
    index_uri = storage.join(base, "index")
    build_index(embeddings, index_uri, overwrite=True, progress=False)
    evaluation = evaluate_index(index_uri, k=10)

    _stage(stages, "serve: Ray Serve on 127.0.0.1")
    first = (
        pq.read_table(storage.parquet_files(test_uri)[0], columns=["id", "image"]).slice(0, 1).to_pylist()[0]
    )
    indexed = pq.read_table(storage.parquet_files(train_uri)[0], columns=["id"]).column("id")[0].as_py()
    url = start_app({"model": model_uri, "index": index_uri}, port=port)
    try:
        latencies = probe_endpoints(url, first["image"], indexed)
    finally:
        if not keep_serving:
            stop_app()

    metrics = read_meta(model_uri)["metrics"]
    print_summary(summary_rows(metrics, evaluation, latencies, sweep_uri, stages, started))
    if keep_serving:
        print(keep_serving_text(url, indexed), flush=True)
        _wait_for_interrupt()
        stop_app()
    return base


def summary_rows(metrics: dict, evaluation: dict, latencies: dict, sweep_uri: str, stages, started: float):
    """The quickstart's summary: what was learnt, how the index and the app did, where time went."""
    return [
        ("fine-tuned accuracy (held-out digits)", f"{metrics['val_acc']:.3f}"),
        (
            "trainable parameters (LoRA + head)",
            f"{metrics['trainable_params']:,} of {metrics['total_params']:,}",
        ),
        ("index recall@10 vs exact", f"{evaluation['recall@10']:.3f}"),
        ("index queries/s (batch 1)", f"{evaluation['qps_batch1']:,.0f}"),
        *[(f"latency {name}", f"{ms:.1f} ms") for name, ms in latencies.items()],
        ("sweep leaderboard", storage.join(sweep_uri, "leaderboard.csv")),
        *_stage_seconds(stages, time.perf_counter()),
        ("total time", f"{time.perf_counter() - started:.0f} s"),
    ]


def keep_serving_text(url: str, indexed: str) -> str:
    return (
        f"\nThe app is still up at {url} (OpenAPI: {url}/docs). Try:\n"
        f"  open {url}/?id={indexed} in a browser: the search page, that digit's neighbours\n"
        f"  curl {url}/v1/health\n"
        f"  curl -F image=@some.png '{url}/v1/classify?k=3'\n"
        f"  curl -H 'content-type: application/json' \\\n"
        f"       -d '{{\"ids\": [\"{indexed}\"]}}' '{url}/v1/search?k=5'\n"
        "Press Ctrl-C to stop."
    )


def _wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
