"""Prometheus metrics of the ingress replica, served at GET /metrics (text format).

One registry per ingress process (one replica); with several ingress replicas Prometheus
scrapes each (or sums them). Batch sizes are counted once per batch: the embedder marks
the first request of each batch, and the ingress that sent it records the size.

    .venv/bin/python -m pytest -q tests/test_serve_live.py -k metrics
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "repforge_requests",
    "HTTP requests by route, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "repforge_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
    registry=REGISTRY,
)
ERRORS = Counter("repforge_errors", "error responses by JSON error code", ["code"], registry=REGISTRY)
BATCH_IMAGES = Histogram(
    "repforge_batch_images",
    "images per batched forward pass of the embedder",
    ["deployment"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    REQUESTS.labels(route, method, str(status)).inc()
    LATENCY.labels(route).observe(seconds)


def observe_error(code: str) -> None:
    ERRORS.labels(code).inc()


def observe_batches(deployment: str, sizes: list[int]) -> None:
    for size in sizes:
        BATCH_IMAGES.labels(deployment).observe(size)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
