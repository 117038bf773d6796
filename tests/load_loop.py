"""A bounded request loop against a running Serve app, for tests that change it under load
(hot swaps, killed replicas, compatible upgrades).

Two client threads alternate /v1/embed and /v1/search by image, each bounded in count and
time; `run_under_load(url, headers, images, action)` starts them, runs `action` once they are
under way, lets 20 more requests land, and returns every outcome as
(status, model fingerprint, path, client retries).
"""

from __future__ import annotations

import threading
import time

import httpx

RETRY_S = 60  # how long the client retries an idempotent call that met a dead replica


def request_loop(url, headers, images, results: list, requests: int, seconds: float, stop) -> None:
    """Both calls are idempotent, so a client may retry them: a 5xx or a dropped connection is
    retried (with backoff, for up to RETRY_S, as a careful client does) and counted."""
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60.0, headers=headers) as client:
        for n in range(requests):
            if stop.is_set() or time.monotonic() > deadline:
                return
            image = images[n % len(images)]
            path = "/v1/embed" if n % 2 else "/v1/search"
            give_up, retry = time.monotonic() + RETRY_S, 0
            while True:
                try:
                    files = [("image", ("0.png", image, "image/png"))]
                    response = client.post(path, files=files, params={} if n % 2 else {"k": 3})
                    outcome = (response.status_code, response.json().get("model"), path, retry)
                except (httpx.HTTPError, ValueError) as err:
                    outcome = (type(err).__name__, None, path, retry)
                if outcome[0] == 200 or (isinstance(outcome[0], int) and outcome[0] < 500):
                    break
                if time.monotonic() > give_up:
                    break
                retry += 1
                time.sleep(min(0.1 * 2**retry, 2.0))
            results.append(outcome)


def run_under_load(url, headers, images, action, requests: int = 400, seconds: float = 90.0) -> list:
    results, stop = [], threading.Event()
    threads = [
        threading.Thread(target=request_loop, args=(url, headers, images, results, requests, seconds, stop))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    try:
        while len(results) < 10 and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        action()
        settled = len(results)
        while len(results) < settled + 20 and any(t.is_alive() for t in threads):
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return results
