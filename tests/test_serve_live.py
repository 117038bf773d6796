"""The Serve app at production depth: auth, metrics, sharded search, live items and classes,
hot swaps under load and a killed replica, over real HTTP on loopback.

    .venv/bin/python -m pytest -q tests/test_serve_live.py

One app serves the whole module: a tiny timm ViT (model A, with a head) behind a bearer
token, two embedder replicas (num_cpus=0, so they fit beside everything else), the real
sklearn digits test set in an index of two shards, and a live classes file. Model B and
its own two shards are there to swap to. Answers are checked against in-process results.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray import serve

from serve.args import ServeArgsError
from serve.classes import knn_vote
from serve.control import APP_NAME, start_app, stop_app, swap_versions
from system import storage
from system.data.transforms import preprocessing_config
from system.embed.batch import embed_images, embeddings_metadata, embeddings_table
from system.index import build_index, open_index
from system.models.artifact import Embedder, create_backbone, save_model
from tests.conftest import free_port
from tests.load_loop import run_under_load

CLASSES = [str(i) for i in range(10)]
TOKEN = "s3cret-token"
# Replicas start in seconds on an idle machine; a 2-core machine shared with other jobs took minutes.
START_TIMEOUT_S = 600
ATOL = 3e-2 if torch.cuda.is_available() else 1e-4
LIMITS = {"max_batch_size": 4, "max_images": 8, "max_k": 50, "max_body_bytes": 1_000_000, "knn_k": 10}


@dataclass
class Live:
    url: str
    client: httpx.Client  # sends the token
    root: object
    metas: dict  # "A" / "B" -> model meta
    models: dict  # "A" / "B" -> Embedder
    ids: list[str]
    images: list[bytes]
    labels: list[int]
    vectors: dict  # "A" / "B" -> in-process embeddings of `images`


def tiny_model(root, seed: int, name: str) -> tuple[Embedder, dict]:
    torch.manual_seed(seed)
    kwargs = {"img_size": 32, "patch_size": 4}
    backbone = create_backbone("test_vit", kwargs)
    model = Embedder(backbone, num_classes=10).eval()
    meta = {
        "timm_name": "test_vit",
        "timm_kwargs": kwargs,
        "preprocessing": preprocessing_config(backbone, 32),
    }
    return model, save_model(str(root / name), model, {**meta, "classes": CLASSES})


def sharded_index(root, name: str, ids, vectors, labels, meta, shards: int = 2) -> list[str]:
    """Index shards of disjoint rows (row i goes to shard i % shards), one folder each."""
    uris = []
    for s in range(shards):
        rows = list(range(s, len(ids), shards))
        folder = root / f"{name}-emb{s}"
        folder.mkdir()
        table = embeddings_table(
            [ids[r] for r in rows],
            vectors[rows],
            {"label": [labels[r] for r in rows]},
            embeddings_metadata(meta, CLASSES),
        )
        pq.write_table(table, folder / "part-00000.parquet")
        build_index(str(folder), str(root / f"{name}-shard{s}"), progress=False)
        uris.append(str(root / f"{name}-shard{s}"))
    return uris


@pytest.fixture(scope="module")
def live(ray_local, digits_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-live")
    table = pq.read_table(storage.parquet_files(digits_data[1]))
    ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
    labels = table.column("label").to_pylist()
    models, metas, vectors, shards = {}, {}, {}, {}
    for seed, name in enumerate("AB"):
        models[name], metas[name] = tiny_model(root, seed, f"model{name}")
        with torch.inference_mode():
            vectors[name] = embed_images(models[name], metas[name]["preprocessing"], images)
        shards[name] = sharded_index(root, name, ids, vectors[name], labels, metas[name])
    (root / "token").write_text(TOKEN + "\n")
    args = {
        "model": str(root / "modelA"),
        "index": shards["A"],
        "classes": str(root / "classes" / "classes.json"),
        "token_file": str(root / "token"),
        "embedder_replicas": 2,
        "ingress_replicas": 2,
        "ingress_search": "on",  # the copies must follow live items, swaps and restarts
        "replica_cpus": 0,
        **LIMITS,
    }
    url = start_app(args, port=free_port(), timeout_s=START_TIMEOUT_S)
    headers = {"authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=url, timeout=60.0, headers=headers) as client:
            live = Live(url, client, root, metas, models, ids, images, labels, vectors)
            live.shards, live.args = shards, args
            yield live
    finally:
        stop_app()


def multipart(images: list[bytes], **fields) -> dict:
    return {"files": [("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)], "data": fields}


def b64(images: list[bytes]) -> list[str]:
    return [base64.b64encode(d).decode() for d in images]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


def replica_actors(deployment: str) -> list:
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::repforge#{deployment}#")
    ]
    return [ray.get_actor(name, namespace="serve") for name in names]


# -- auth and metrics -----------------------------------------------------------------


def test_auth(live):
    with httpx.Client(base_url=live.url, timeout=30.0) as anonymous:
        assert anonymous.get("/v1/health").json() == {"status": "ok"}  # open: load balancers probe it
        for page in ("/openapi.json", "/docs", "/redoc"):  # the API's description is public
            assert anonymous.get(page).status_code == 200, page
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": TOKEN},
            {"authorization": "Basic x"},
        ):
            response = anonymous.post("/v1/embed", json={"images": b64(live.images[:1])}, headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
        assert_error(anonymous.get("/v1/info"), 401, "unauthorized")
        assert_error(anonymous.get("/metrics"), 401, "unauthorized")
    assert live.client.post("/v1/embed", json={"images": b64(live.images[:1])}).status_code == 200


def test_metrics(live):
    # Each ingress replica counts what it served (Prometheus scrapes each): the requests go
    # a few times, so both replicas see some, and a replica that served them shows them.
    for _ in range(4):
        for n in (1, 3):
            assert live.client.post("/v1/embed", **multipart(live.images[:n])).status_code == 200
        live.client.post("/v1/embed", json={"images": ["!!"]})
    texts = [live.client.get("/metrics").text for _ in range(8)]

    def some(condition) -> bool:
        return any(condition(text) for text in texts)

    assert some(lambda t: 'repforge_requests_total{method="POST",route="/v1/embed",status="200"}' in t)
    assert some(lambda t: 'repforge_request_seconds_bucket{le="0.5",route="/v1/embed"}' in t)
    assert some(lambda t: 'repforge_errors_total{code="bad_base64"}' in t)

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name)]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert some(lambda t: value(t, "repforge_batch_images_count") >= 1)
    assert some(lambda t: value(t, "repforge_batch_images_sum") >= 3)


# -- sharded retrieval and live items ------------------------------------------------


def test_sharded_search_is_the_exact_whole_index_top_k(live):
    # Exact top-k over both shards, from the in-process vectors: the scores of a brute-force search.
    queries, k = live.vectors["A"][[0, 7, 100]], 12
    got = live.client.post("/v1/search", json={"vectors": queries.tolist(), "k": k}).json()["results"]
    scores = queries @ live.vectors["A"].T
    for row, hits in zip(scores, got, strict=True):
        expected = np.sort(row)[::-1][:k]
        np.testing.assert_allclose([h["score"] for h in hits], expected, atol=1e-5)
        for h in hits:
            assert h["metadata"]["label"] == live.labels[live.ids.index(h["id"])]
    by_id = live.client.post("/v1/search", json={"ids": [live.ids[7], live.ids[8]], "k": 3}).json()["results"]
    assert [row[0]["id"] for row in by_id] == [live.ids[7], live.ids[8]]
    info = live.client.get("/v1/info").json()["index"]
    assert info["count"] == len(live.ids) and len(info["shards"]) == 2


def top_ids(live, image: bytes, k: int = 3) -> list[str]:
    response = live.client.post("/v1/search", **multipart([image]), params={"k": k})
    assert response.status_code == 200, response.text
    return [h["id"] for h in response.json()["results"][0]]


def test_items_add_upsert_remove_persisted(live):
    fresh = live.images[5]
    body = {"ids": ["live/1"], "images": b64([fresh]), "metadata": [{"label": 4}]}
    added = live.client.post("/v1/items", json=body).json()
    assert added == {"added": 1, "replaced": 0, "removed": 0, "count": len(live.ids) + 1}
    assert "live/1" in top_ids(live, fresh, 2)
    # Its image is stored with it (the index's rows hold no images of their own).
    image = live.client.get("/v1/items/live/1/image")
    assert image.status_code == 200 and image.content == fresh
    # Upsert by multipart: the same id, another image; the old vector is gone.
    response = live.client.post("/v1/items", **multipart([live.images[9]], id="live/1"))
    assert response.json()["replaced"] == 1, response.text
    hits = live.client.post("/v1/search", json={"ids": ["live/1"], "k": 2}).json()["results"][0]
    assert {h["id"] for h in hits} == {"live/1", live.ids[9]}
    # Persisted: the shard folder on disk holds it (index.save() after each change).
    on_disk = sum(len(open_index(uri)) for uri in live.shards["A"])
    assert on_disk == len(live.ids) + 1
    removed = live.client.request("DELETE", "/v1/items", json={"ids": ["live/1"]}).json()
    assert removed["removed"] == 1 and removed["count"] == len(live.ids)
    assert_error(live.client.post("/v1/search", json={"ids": ["live/1"]}), 404, "unknown_id")
    assert sum(len(open_index(uri)) for uri in live.shards["A"]) == len(live.ids)


# -- classify: head, live prototypes, kNN vote -----------------------------------------


def test_live_classes_prototypes_survive_a_restart(live):
    examples = {
        name: [i for i, lab in enumerate(live.labels) if lab == label][:4]
        for name, label in (("zero", 0), ("one", 1))
    }
    for name, rows in examples.items():
        body = {"name": name, "images": b64([live.images[i] for i in rows])}
        assert live.client.post("/v1/classes", json=body).status_code == 200
    listed = live.client.get("/v1/classes").json()
    assert listed["model"] == live.metas["A"]["fingerprint"]
    assert listed["classes"] == [{"name": "one", "examples": 4}, {"name": "zero", "examples": 4}]
    # Nearest class mean, computed in-process from the same images.
    unit = live.vectors["A"] / np.linalg.norm(live.vectors["A"], axis=1, keepdims=True)
    protos = {n: unit[rows].mean(0) / np.linalg.norm(unit[rows].mean(0)) for n, rows in examples.items()}
    queries = [i for i, lab in enumerate(live.labels) if lab in (0, 1)][10:16]
    got = live.client.post(
        "/v1/classify", **multipart([live.images[i] for i in queries]), params={"mode": "prototype", "k": 2}
    ).json()
    assert got["mode"] == "prototype"
    for i, row in zip(queries, got["predictions"], strict=True):
        expected = {n: float(unit[i] @ p) for n, p in protos.items()}
        assert row[0]["label"] == max(expected, key=expected.get)
        for p in row:
            assert p["score"] == pytest.approx(expected[p["label"]], abs=ATOL)
    # A restarted classes replica reloads them from storage.
    for actor in replica_actors("ClassesDeployment"):
        ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = live.client.get("/v1/classes")
        if response.status_code == 200:
            break
        time.sleep(0.5)
    assert response.json()["classes"] == listed["classes"], response.text
    assert live.client.request("DELETE", "/v1/classes", params={"name": "one"}).json()["classes"] == [
        {"name": "zero", "examples": 4}
    ]
    assert_error(live.client.request("DELETE", "/v1/classes", params={"name": "one"}), 404, "unknown_class")


def test_retried_class_changes_apply_once(tmp_path):
    """The ingress retries a call whose replica died; one that had saved its change must not apply twice."""
    import asyncio

    from serve.classes import ClassesDeployment

    store = ClassesDeployment.func_or_class  # the plain class under the deployment
    uri = str(tmp_path / "classes.json")
    a, b = np.eye(4, dtype=np.float32)[:1], np.eye(4, dtype=np.float32)[1:2]

    async def scenario():
        first = store(uri)
        await first.add("cat", a, "fp", "change-1")
        await first.add("cat", b, "fp", "change-2")
        restarted = store(uri)  # the replica died after saving change-2, before it replied
        assert await restarted.add("cat", b, "fp", "change-2") == [{"name": "cat", "examples": 2}]
        assert await restarted.add("cat", b, "fp", "change-3") == [{"name": "cat", "examples": 3}]
        assert await restarted.remove("cat", "fp", "change-4")
        assert await store(uri).remove("cat", "fp", "change-4")  # a retried remove: no 404
        assert not await store(uri).remove("cat", "fp", "change-5")  # a new one: gone
        return store(uri)

    final = asyncio.run(scenario())
    assert final.classes == {"fp": {}} and final.applied[-2:] == ["change-3", "change-4"]


def test_knn_vote_and_head(live):
    picks = [3, 40, 41]
    images = [live.images[i] for i in picks]
    got = live.client.post("/v1/classify", json={"images": b64(images), "mode": "knn", "k": 3}).json()
    scores = live.vectors["A"][picks] @ live.vectors["A"].T
    hits = [[{"metadata": {"label": live.labels[j]}} for j in np.argsort(-row)[:10]] for row in scores]
    expected = knn_vote(hits, CLASSES, 3)
    for want, row in zip(expected, got["predictions"], strict=True):
        assert {p["label"]: p["score"] for p in row} == pytest.approx({p["label"]: p["score"] for p in want})
    head = live.client.post("/v1/classify", json={"images": b64(images)}).json()
    assert head["mode"] == "head" and len(head["predictions"][0]) == 5


# -- bad input on the new routes -------------------------------------------------------

PNG_BAD = b"\x89PNG\r\n\x1a\n" + b"\x00" * 10


def digit_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


PNG = digit_png()
BAD_LIVE = {
    "items: ids and images differ": (
        "POST",
        "/v1/items",
        {"json": {"ids": ["a", "b"], "images": ["AAAA"]}},
        422,
        "validation_error",
    ),
    "items: multipart without id": ("POST", "/v1/items", multipart([PNG]), 422, "validation_error"),
    "items: duplicate ids": (
        "POST",
        "/v1/items",
        {"json": {"ids": ["a", "a"], "images": b64([PNG, PNG])}},
        422,
        "validation_error",
    ),
    "items: metadata of another type": (
        "POST",
        "/v1/items",
        {"json": {"ids": ["a"], "images": b64([PNG]), "metadata": [{"label": "not an int"}]}},
        422,
        "invalid_item",
    ),
    "items: metadata not a list": (
        "POST",
        "/v1/items",
        {"json": {"ids": ["a"], "images": ["QQ=="], "metadata": 3}},
        422,
        "validation_error",
    ),
    "items: delete unknown": ("DELETE", "/v1/items", {"json": {"ids": ["nope"]}}, 404, "unknown_id"),
    "items: delete without ids": ("DELETE", "/v1/items", {"json": {"ids": []}}, 422, "validation_error"),
    "classes: no name": ("POST", "/v1/classes", {"json": {"images": ["QQ=="]}}, 422, "validation_error"),
    "classes: truncated png": ("POST", "/v1/classes", multipart([PNG_BAD], name="x"), 400, "invalid_image"),
    "classes: delete unknown": ("DELETE", "/v1/classes", {"params": {"name": "nope"}}, 404, "unknown_class"),
    "classify: unknown mode": (
        "POST",
        "/v1/classify",
        {"json": {"images": ["QQ=="], "mode": "magic"}},
        422,
        "validation_error",
    ),
    "search: huge k": ("POST", "/v1/search", {"json": {"ids": ["x"], "k": 10**12}}, 422, "invalid_k"),
    "search: wrong dim on shards": (
        "POST",
        "/v1/search",
        {"json": {"vectors": [[0.5] * 5]}},
        422,
        "invalid_vector",
    ),
    "auth: bearer without token": (
        "POST",
        "/v1/embed",
        {"json": {}, "headers": {"authorization": "Bearer"}},
        401,
        "unauthorized",
    ),
}


@pytest.mark.parametrize("name", list(BAD_LIVE))
def test_bad_input_on_live_routes(live, name):
    method, path, kwargs, status, code = BAD_LIVE[name]
    assert_error(live.client.request(method, path, **kwargs), status, code)
    assert live.client.get("/v1/health").json() == {"status": "ok"}


# -- hot swap and a killed replica, under a bounded request loop ---------------------------


def under_load(live, action) -> list:
    return run_under_load(live.url, dict(live.client.headers), live.images[:50], action)


def test_hot_swap_under_load_and_a_refused_swap(live):
    a, b = live.metas["A"]["fingerprint"], live.metas["B"]["fingerprint"]
    swapped_at = []
    results = under_load(
        live,
        lambda: (
            swap_versions(model=str(live.root / "modelB"), index=live.shards["B"]),
            swapped_at.append(True),
        ),
    )
    failed = [r for r in results if r[0] != 200]
    print(f"hot swap: {len(results)} requests, {len(failed)} failed")
    assert not failed, failed[:5]
    models = [m for _, m, _, _ in results]
    assert set(models) == {a, b} and models[-1] == b
    # New requests see the new version, and its numbers are model B's.
    got = live.client.post("/v1/embed", json={"images": b64(live.images[:2])}).json()
    assert got["model"] == b
    np.testing.assert_allclose(got["embeddings"], live.vectors["B"][:2], atol=ATOL)
    hits = live.client.post("/v1/search", json={"vectors": live.vectors["B"][:1].tolist(), "k": 1}).json()
    assert hits["results"][0][0]["id"] == live.ids[0]
    # Model B with model A's index: refused before anything changes.
    with pytest.raises(ServeArgsError, match="built from model"):
        swap_versions(index=live.shards["A"])
    assert live.client.post("/v1/embed", json={"images": b64(live.images[:1])}).json()["model"] == b


def wait_replaced(deployment: str, before: list, timeout_s: float = 120.0) -> list:
    """The deployment's replicas once Serve has replaced the killed one (as many, a new name)."""
    names = {a._actor_id for a in before}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = replica_actors(deployment)
        if len(now) == len(before) and {a._actor_id for a in now} != names:
            return now
        time.sleep(0.5)
    raise AssertionError(f"{deployment}: no replacement replica within {timeout_s} s")


@pytest.mark.parametrize("deployment", ["RepforgeIngress", "EmbedderDeployment", "RetrieverDeployment0"])
def test_killed_replica_under_load(live, deployment):
    """A replica killed under a bounded request loop: it dies, Serve replaces it, and no request
    fails (the ingress retries its calls on the live replica; a client retries a call whose
    ingress replica died under it, counted below)."""
    actors = replica_actors(deployment)
    assert len(actors) == (1 if deployment.startswith("Retriever") else 2)
    victim = actors[0]
    results = under_load(live, lambda: ray.kill(victim, no_restart=True))
    with pytest.raises(ray.exceptions.RayActorError):  # the kill happened
        ray.get(victim.__ray_ready__.remote(), timeout=30)
    failed = [r for r in results if r[0] != 200]
    retried = sum(1 for r in results if r[3])
    print(
        f"{deployment} replica killed: {len(results)} requests, {retried} retried by the client, "
        f"{len(failed)} failed"
    )
    assert not failed, failed[:5]
    wait_replaced(deployment, actors)
    assert live.client.get("/v1/health").json() == {"status": "ok"}


def test_retriever_keeps_the_previous_index_only_for_another_model(live):
    """Across a model swap the old index answers the old model's queries; otherwise it is freed."""
    import asyncio

    from serve.errors import VersionMismatch
    from serve.retriever import RetrieverDeployment

    retriever = RetrieverDeployment.func_or_class(persist=False)  # the plain class under the deployment
    model = {name: str(live.root / f"model{name}") for name in "AB"}
    fingerprint = {name: live.metas[name]["fingerprint"] for name in "AB"}

    async def scenario():
        await retriever.reconfigure({"model": model["A"], "index": live.shards["A"][0]})
        await retriever.reconfigure({"model": model["B"], "index": live.shards["B"][0]})
        old = await retriever.search(live.vectors["A"][:1], 1, fingerprint["A"])
        assert old["hits"][0][0]["id"] == live.ids[0]  # row 0 is in shard 0, found by model A's index
        await retriever.reconfigure({"model": model["B"], "index": live.shards["B"][1]})
        assert retriever.previous is None  # same model: nothing could still need the old index
        with pytest.raises(VersionMismatch):
            await retriever.search(live.vectors["A"][:1], 1, fingerprint["A"])

    asyncio.run(scenario())


def test_live_items_and_classes_survive_an_app_restart(live):
    """Delete the whole app and deploy it again: live items (with their images) and live classes
    come back from storage."""
    fingerprint = live.client.get("/v1/info").json()["model"]["fingerprint"]
    name = "B" if fingerprint == live.metas["B"]["fingerprint"] else "A"
    item = live.images[11]
    body = {"ids": ["live/restart"], "images": b64([item]), "metadata": [{"label": 1}]}
    assert live.client.post("/v1/items", json=body).status_code == 200
    assert live.client.post("/v1/classes", json={"name": "restart", "images": b64([item])}).status_code == 200
    before = live.client.get("/v1/classes").json()["classes"]
    serve.delete(APP_NAME)  # every replica goes; Serve itself stays up, as on a cluster
    assert not replica_actors("RepforgeIngress") and not replica_actors("ClassesDeployment")
    args = {**live.args, "model": str(live.root / f"model{name}"), "index": live.shards[name]}
    assert start_app(args, port=int(live.url.rsplit(":", 1)[1]), timeout_s=START_TIMEOUT_S) == live.url
    hits = live.client.post("/v1/search", json={"ids": ["live/restart"], "k": 1}).json()["results"]
    assert hits[0][0]["id"] == "live/restart" and hits[0][0]["metadata"] == {"label": 1}
    assert live.client.get("/v1/items/live/restart/image").content == item
    assert live.client.get("/v1/classes").json()["classes"] == before
