"""The Serve app end to end: real HTTP on loopback to a real app over a real model and FAISS index.

    .venv/bin/python -m pytest -q tests/test_serve.py

One app serves the whole module (start_app on a free port); its model is a tiny timm ViT
with a 10-class head, its index holds the embeddings of the real sklearn digits test set.
Answers are checked against the same model run in-process.
"""

from __future__ import annotations

import base64
import json
import math
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ray import serve

from serve.app import build_app
from serve.args import ServeArgsError
from serve.control import APP_NAME, start_app, stop_app
from system import storage
from system.data.transforms import eval_transform, images_to_tensor, preprocessing_config
from system.embed.batch import embed_images, embeddings_metadata, embeddings_table, with_source
from system.index import build_index
from system.models.artifact import Embedder, create_backbone, save_model

CLASSES = [str(i) for i in range(10)]
MATRYOSHKA_DIMS = (16, 32)
LIMITS = {"max_batch_size": 4, "max_images": 8, "max_k": 50, "max_body_bytes": 1_000_000}
# The served model runs under bf16 autocast when the replica gets a GPU; fp32 on CPU.
ATOL = 3e-2 if torch.cuda.is_available() else 1e-4
START_TIMEOUT_S = 600  # seconds on an idle machine; minutes on a 2-core machine shared with other jobs


@dataclass
class Served:
    url: str
    client: httpx.Client
    model: Embedder
    meta: dict
    ids: list[str]
    images: list[bytes]
    labels: list[int]
    vectors: np.ndarray  # in-process embeddings of `images`, the ground truth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(root, num_classes: int, name: str) -> tuple[Embedder, dict]:
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4}
    backbone = create_backbone("test_vit", kwargs)
    model = Embedder(backbone, num_classes=num_classes).eval()
    meta = {
        "timm_name": "test_vit",
        "timm_kwargs": kwargs,
        "preprocessing": preprocessing_config(backbone, 32),
        "classes": CLASSES if num_classes else [],
        "matryoshka_dims": list(MATRYOSHKA_DIMS),  # recorded as if trained so: prefix search
    }
    return model, save_model(str(root / name), model, meta)


@pytest.fixture(scope="module")
def artifacts(digits_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model, meta = tiny_model(root, 10, "model")
    files = storage.parquet_files(digits_data[1])
    table = pq.read_table(files)
    ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
    vectors = embed_images(model, meta["preprocessing"], images)
    (root / "embeddings").mkdir()
    embeddings = embeddings_table(
        ids, vectors, {"label": table.column("label")}, embeddings_metadata(meta, CLASSES)
    )
    # Where each row came from, as `repforge embed` records it (the thumbnails read it).
    assert len(files) == 1
    embeddings = with_source(embeddings.take(np.random.default_rng(0).permutation(len(ids))), files[0])
    pq.write_table(embeddings, root / "embeddings" / "part-00000.parquet")
    build_index(str(root / "embeddings"), str(root / "index"), progress=False)
    return root, model, meta, ids, images, table.column("label").to_pylist(), vectors


@pytest.fixture(scope="module")
def served(ray_local, artifacts):
    root, model, meta, ids, images, labels, vectors = artifacts
    url = start_app(
        {"model": str(root / "model"), "index": str(root / "index"), **LIMITS},
        port=free_port(),
        timeout_s=START_TIMEOUT_S,
    )
    try:
        with httpx.Client(base_url=url, timeout=60.0) as client:
            yield Served(url, client, model, meta, ids, images, labels, vectors)
    finally:
        stop_app()


def multipart(images: list[bytes]) -> list:
    return [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def b64(images: list[bytes]) -> dict:
    return {"images": [base64.b64encode(data).decode() for data in images]}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


# -- happy paths ----------------------------------------------------------------------


def test_health_info_and_docs(served):
    assert served.client.get("/v1/health").json() == {"status": "ok"}
    info = served.client.get("/v1/info").json()
    assert info["model"]["fingerprint"] == served.meta["fingerprint"]
    assert info["index"]["dim"] == served.meta["embedding_dim"] and info["index"]["count"] == len(served.ids)
    assert info["limits"]["max_k"] == LIMITS["max_k"]
    # A one-shard index that fits: searched in the ingress; its metadata columns are filterable.
    assert info["index"]["searched_in_ingress"] is True and info["index"]["filterable"] == ["label"]
    assert served.client.get("/docs").status_code == 200
    paths = served.client.get("/openapi.json").json()["paths"]
    assert {"/v1/embed", "/v1/classify", "/v1/search", "/v1/health", "/v1/info"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/embed"]["post"]["requestBody"]["content"]


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_embed_matches_in_process(served, encoding):
    picks = [0, 5, 17]
    images = [served.images[i] for i in picks]
    if encoding == "multipart":
        response = served.client.post("/v1/embed", files=multipart(images))
    else:
        response = served.client.post("/v1/embed", json=b64(images))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == served.meta["embedding_dim"] and body["model"] == served.meta["fingerprint"]
    np.testing.assert_allclose(np.array(body["embeddings"]), served.vectors[picks], atol=ATOL)


def test_embed_batches_concurrent_requests(served):
    # Requests of 1..8 images (8 > max_batch_size=4 is split) sent at once share batches;
    # every answer must still be the right rows, in order.
    requests = [list(range(start, start + n)) for start, n in zip(range(0, 80, 10), range(1, 9), strict=True)]

    def embed(picks):
        response = served.client.post("/v1/embed", files=multipart([served.images[i] for i in picks]))
        assert response.status_code == 200, response.text
        return np.array(response.json()["embeddings"])

    with ThreadPoolExecutor(8) as pool:
        for picks, got in zip(requests, pool.map(embed, requests), strict=True):
            np.testing.assert_allclose(got, served.vectors[picks], atol=ATOL)


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_classify_top_k(served, encoding):
    picks, k = [3, 4], 3
    images = [served.images[i] for i in picks]
    if encoding == "multipart":
        response = served.client.post("/v1/classify", files=multipart(images), params={"k": k})
    else:
        response = served.client.post("/v1/classify", json={**b64(images), "k": k})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    with torch.inference_mode():
        batch = torch.from_numpy(images_to_tensor(images, eval_transform(served.meta["preprocessing"])))
        probs = served.model.classify(batch).softmax(-1).numpy()
    for row, expected in zip(predictions, probs, strict=True):
        # Scores are checked per label, so near-ties may come back in either order.
        labels, scores = [p["label"] for p in row], np.array([p["score"] for p in row])
        assert len(set(labels)) == k and set(labels) <= set(CLASSES)
        np.testing.assert_allclose(scores, expected[[CLASSES.index(lab) for lab in labels]], atol=ATOL)
        np.testing.assert_allclose(scores, np.sort(expected)[::-1][:k], atol=ATOL)
        assert scores.sum() <= 1 + 1e-6


def test_classify_default_k(served):
    response = served.client.post("/v1/classify", files=multipart(served.images[:1]))
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]) == 5


def distinct_rows(vectors: np.ndarray, count: int) -> list[int]:
    # Some digits are pixel-identical; a query for one of them may rightly return its twin first.
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    rows = [int(i) for i in np.flatnonzero(sims.max(axis=1) < 1 - 1e-4)[:count]]
    assert len(rows) == count, "too few distinct digits for a meaningful search test"
    return rows


def test_search_by_vector_and_image(served):
    picks = distinct_rows(served.vectors, 3)
    by_vector = served.client.post(
        "/v1/search", json={"vectors": served.vectors[picks].tolist(), "k": 5}
    ).json()["results"]
    by_image = served.client.post(
        "/v1/search", files=multipart([served.images[i] for i in picks]), params={"k": 5}
    ).json()["results"]
    for i, from_vector, from_image in zip(picks, by_vector, by_image, strict=True):
        for hits in (from_vector, from_image):
            assert len(hits) == 5
            assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:], strict=False))
            # The cosine similarity of a normalised vector with itself.
            assert hits[0]["score"] == pytest.approx(1.0, abs=ATOL)
        # The stored vector finds itself first; the re-embedded image does too (up to bf16 noise on GPU).
        assert (
            from_vector[0]["id"] == served.ids[i] and from_vector[0]["metadata"]["label"] == served.labels[i]
        )
        own = [h for h in from_image if h["id"] == served.ids[i]]
        assert own and own[0]["score"] >= from_image[0]["score"] - ATOL
        assert own[0]["metadata"]["label"] == served.labels[i]
        if ATOL < 1e-3:
            assert from_image[0]["id"] == served.ids[i]


def test_search_by_id(served):
    picks = distinct_rows(served.vectors, 2)
    response = served.client.post("/v1/search", json={"ids": [served.ids[i] for i in picks]}, params={"k": 3})
    assert response.status_code == 200, response.text
    for i, hits in zip(picks, response.json()["results"], strict=True):
        assert len(hits) == 3 and hits[0]["id"] == served.ids[i]
        assert hits[0]["metadata"]["label"] == served.labels[i]


def test_search_page_is_served(served):
    page = served.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/search.js">' in page.text and "http" not in page.text.split("<body>")[1]
    script = served.client.get("/static/search.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/v1/search" in script.text and "fetch(" in script.text
    assert_error(served.client.get("/static/nothing.css"), 404, "not_found")


def test_item_image(served):
    """The stored image of an indexed item, read from its dataset row; resized; cached by ETag."""
    import io

    from PIL import Image

    row = 123
    item = served.ids[row]
    whole = served.client.get(f"/v1/items/{item}/image")
    assert whole.status_code == 200, whole.text
    assert whole.content == served.images[row]  # no size: the dataset's own bytes
    assert whole.headers["cache-control"].startswith("private, max-age=") and whole.headers["etag"]
    # The first row of a file is row 0, not "no row": its own bytes, not the whole Parquet file.
    first = served.client.get(f"/v1/items/{served.ids[0]}/image")
    assert first.status_code == 200 and first.content == served.images[0], first.text
    # Digits are 8x8: a larger size gives the original, a smaller one a resized PNG.
    assert served.client.get(f"/v1/items/{item}/image", params={"size": 64}).content == served.images[row]
    small = served.client.get(f"/v1/items/{item}/image", params={"size": 4})
    assert small.status_code == 200 and small.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(small.content)) as img:
        assert max(img.size) == 4
        original = Image.open(io.BytesIO(served.images[row]))
        assert img.size[0] / img.size[1] == pytest.approx(original.size[0] / original.size[1], rel=0.1)
    again = served.client.get(
        f"/v1/items/{item}/image", params={"size": 4}, headers={"if-none-match": small.headers["etag"]}
    )
    assert again.status_code == 304 and not again.content
    assert_error(served.client.get("/v1/items/no/such/id/image"), 404, "unknown_id")
    assert_error(served.client.get(f"/v1/items/{item}/image", params={"size": 1}), 422, "invalid_size")


def test_filtered_search(served):
    """`filter` in JSON and as a multipart field: the exact top-k among the matching items."""
    picks, k, label = distinct_rows(served.vectors, 2), 5, 3
    matching = [i for i, lab in enumerate(served.labels) if lab == label]
    body = {"vectors": served.vectors[picks].tolist(), "k": k, "filter": {"label": label}}
    response = served.client.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    for q, hits in zip(picks, response.json()["results"], strict=True):
        exact = np.sort(served.vectors[matching] @ served.vectors[q])[::-1][:k]
        assert all(h["metadata"]["label"] == label for h in hits)
        np.testing.assert_allclose([h["score"] for h in hits], exact, atol=1e-5)
    by_image = served.client.post(
        "/v1/search",
        files=multipart([served.images[picks[0]]]),
        data={"filter": json.dumps({"label": {"ne": label}})},
        params={"k": k},
    )
    assert by_image.status_code == 200, by_image.text
    assert all(h["metadata"]["label"] != label for h in by_image.json()["results"][0])
    by_id = served.client.post(
        "/v1/search", json={"ids": [served.ids[matching[0]]], "filter": {"label": label}}
    )
    assert by_id.json()["results"][0][0]["id"] == served.ids[matching[0]]


def test_search_on_a_matryoshka_prefix(served):
    """dim=16 scores each item by the normalised query prefix . the item's first 16 dims."""
    dim, picks = MATRYOSHKA_DIMS[0], distinct_rows(served.vectors, 3)
    prefix = served.vectors[picks, :dim] / np.linalg.norm(served.vectors[picks, :dim], axis=1, keepdims=True)
    scores = prefix @ served.vectors[:, :dim].T  # [query, item], the exact answer
    row_of = {item: j for j, item in enumerate(served.ids)}

    def check(results, queries):
        for q, hits in zip(queries, results, strict=True):
            # Ties (some digits are pixel twins) may order equal scores either way: compare scores.
            top = np.sort(scores[q])[::-1][:5]
            np.testing.assert_allclose([h["score"] for h in hits], top, atol=ATOL)
            for h in hits:  # and each hit is scored by its own prefix
                assert h["score"] == pytest.approx(scores[q, row_of[h["id"]]], abs=ATOL)

    full, short = served.vectors[picks].tolist(), served.vectors[picks, :dim].tolist()
    for body, params in (
        ({"vectors": full, "dim": dim}, {"k": 5}),  # the query's own prefix is taken
        ({"vectors": short}, {"k": 5, "dim": dim}),  # a client that keeps 16-dim vectors
        ({"ids": [served.ids[i] for i in picks], "dim": dim, "k": 5}, {}),
    ):
        response = served.client.post("/v1/search", json=body, params=params)
        assert response.status_code == 200, response.text
        check(response.json()["results"], range(len(picks)))
    # By image: the replica embeds it and cuts the prefix the same way.
    response = served.client.post(
        "/v1/search", files=multipart([served.images[picks[0]]]), params={"k": 5, "dim": dim}
    )
    assert response.status_code == 200, response.text
    check(response.json()["results"], [0])


# -- bad input ------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR chunk claiming a huge image, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def digit_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


PNG = digit_png()


def test_ingress_middleware_times_out_refuses_and_counts(tmp_path):
    """The ingress middleware (serve.ingress.Guard) on a plain FastAPI app under uvicorn on
    loopback, no Ray: past the request timeout a 504 JSON error, without the token a 401,
    and both counted in the metrics by route and status."""
    import asyncio
    import hashlib
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI

    from serve import auth, metrics
    from serve.guard import Guard

    app = FastAPI()
    app.add_middleware(Guard)

    @app.get("/v1/info")
    async def slow():
        await asyncio.sleep(3)  # 15x the timeout below
        return {}

    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    def count(route: str, status: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "repforge_requests_total", {"route": route, "method": "GET", "status": status}
        )
        return value or 0.0

    kept = dict(auth.RUNTIME)
    auth.configure(hashlib.sha256(b"secret").hexdigest(), timeout_s=0.2)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        before = count("/v1/info", "504"), count("/v1/info", "401"), count("/v1/health", "200")
        url = f"http://127.0.0.1:{server.config.port}"
        with httpx.Client(base_url=url, timeout=30.0) as client:
            assert_error(client.get("/v1/info", headers={"Authorization": "Bearer secret"}), 504, "timeout")
            denied = client.get("/v1/info")
            assert_error(denied, 401, "unauthorized")
            assert denied.headers["www-authenticate"] == "Bearer"
            assert client.get("/v1/health").json() == {"status": "ok"}  # open without a token
        after = count("/v1/info", "504"), count("/v1/info", "401"), count("/v1/health", "200")
        assert [a - b for a, b in zip(after, before)] == [1, 1, 1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        auth.RUNTIME.update(kept)


def as_format(png: bytes, fmt: str) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, format=fmt)
    return out.getvalue()


JSON = {"content-type": "application/json"}
BAD_INPUTS = {
    # name: (path, request kwargs, status, error code)
    "truncated png": ("/v1/embed", {"files": multipart([PNG[: len(PNG) // 2]])}, 400, "invalid_image"),
    "text as image": ("/v1/embed", {"files": multipart([b"hello, not an image"])}, 400, "invalid_image"),
    "tiff image": (
        "/v1/embed",
        {"files": multipart([as_format(PNG, "TIFF")])},
        415,
        "unsupported_image_format",
    ),
    "empty image part": ("/v1/classify", {"files": multipart([b""])}, 400, "invalid_image"),
    "0-byte body": ("/v1/embed", {"content": b"", "headers": JSON}, 400, "empty_body"),
    "20000x20000 header": (
        "/v1/embed",
        {"files": multipart([png_claiming(20000, 20000)])},
        413,
        "too_many_pixels",
    ),
    "images not a list": ("/v1/embed", {"json": {"images": "abc"}}, 422, "validation_error"),
    "images of numbers": ("/v1/search", {"json": {"images": [1, 2]}}, 422, "validation_error"),
    "json not an object": ("/v1/embed", {"json": [1, 2]}, 422, "validation_error"),
    "missing images": ("/v1/embed", {"json": {}}, 422, "validation_error"),
    "missing query": ("/v1/search", {"json": {"k": 3}}, 422, "validation_error"),
    "two query kinds": ("/v1/search", {"json": {"ids": ["a"], "vectors": [[0.0]]}}, 422, "validation_error"),
    "unknown field": ("/v1/embed", {"json": {**b64([PNG]), "extra": 1}}, 422, "validation_error"),
    "no image part": (
        "/v1/embed",
        {"files": [("picture", ("a.png", PNG, "image/png"))]},
        422,
        "validation_error",
    ),
    "malformed json": ("/v1/embed", {"content": b'{"images": [', "headers": JSON}, 400, "invalid_json"),
    "bad base64": ("/v1/embed", {"json": {"images": ["not base64 !!"]}}, 400, "bad_base64"),
    "base64 of text": ("/v1/search", {"json": b64([b"plain text"])}, 400, "invalid_image"),
    "nan vector": (
        "/v1/search",
        {"content": json.dumps({"vectors": [[math.nan] * 64]}), "headers": JSON},
        422,
        "validation_error",
    ),
    "float32 overflow": ("/v1/search", {"json": {"vectors": [[1e300] * 64]}}, 422, "invalid_vector"),
    "wrong dimension": ("/v1/search", {"json": {"vectors": [[0.1] * 3]}}, 422, "invalid_vector"),
    "ragged vectors": ("/v1/search", {"json": {"vectors": [[0.1] * 64, [0.1] * 63]}}, 422, "invalid_vector"),
    "k=0": ("/v1/search", {"json": {"ids": ["digits/0000"]}, "params": {"k": 0}}, 422, "invalid_k"),
    "huge k": ("/v1/classify", {"files": multipart([PNG]), "params": {"k": 10**9}}, 422, "invalid_k"),
    "k in body": ("/v1/search", {"json": {"ids": ["x"], "k": -1}}, 422, "invalid_k"),
    "k not a number": (
        "/v1/search",
        {"json": {"ids": ["x"]}, "params": {"k": "many"}},
        422,
        "validation_error",
    ),
    "unknown id": ("/v1/search", {"json": {"ids": ["no/such/id"]}}, 404, "unknown_id"),
    "unsupported content type": (
        "/v1/embed",
        {"content": PNG, "headers": {"content-type": "image/png"}},
        415,
        "unsupported_media_type",
    ),
    "no content type": ("/v1/embed", {"content": b"abc"}, 415, "unsupported_media_type"),
    "body over max_body_bytes": (
        "/v1/embed",
        {"files": multipart([b"x" * 1_100_000])},
        413,
        "body_too_large",
    ),
    "too many images (multipart)": ("/v1/embed", {"files": multipart([PNG] * 9)}, 413, "too_many_images"),
    "too many images (json)": ("/v1/embed", {"json": b64([PNG] * 9)}, 413, "too_many_images"),
    "too many ids": ("/v1/search", {"json": {"ids": ["x"] * 9}}, 413, "too_many_ids"),
    "broken multipart": (
        "/v1/embed",
        {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
        400,
        "invalid_multipart",
    ),
    "unknown route": ("/v1/nothing", {"json": {}}, 404, "not_found"),
    "dim not a trained Matryoshka dim": (
        "/v1/search",
        {"json": {"vectors": [[0.1] * 64], "dim": 20}},
        422,
        "invalid_dim",
    ),
    "dim with vectors of another length": (
        "/v1/search",
        {"json": {"vectors": [[0.1] * 20]}, "params": {"dim": 16}},
        422,
        "invalid_dim",
    ),
    "filter on an unknown column": (
        "/v1/search",
        {"json": {"vectors": [[0.1] * 64], "filter": {"no_such_column": 1}}},
        422,
        "invalid_filter",
    ),
    "filter value of another type": (
        "/v1/search",
        {"json": {"vectors": [[0.1] * 64], "filter": {"label": "three"}}},
        422,
        "invalid_filter",
    ),
    "filter not a JSON object": (
        "/v1/search",
        {"json": {"ids": ["x"], "filter": [1]}},
        422,
        "validation_error",
    ),
    "filter field not JSON (multipart)": (
        "/v1/search",
        {"files": multipart([PNG]), "data": {"filter": "{label: 3"}},
        400,
        "invalid_filter",
    ),
    "image and id in one search (multipart)": (
        "/v1/search",
        {"files": multipart([PNG]), "data": {"id": "x"}},
        422,
        "validation_error",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_json_4xx(served, name):
    path, kwargs, status, code = BAD_INPUTS[name]
    assert_error(served.client.post(path, **kwargs), status, code)
    assert served.client.get("/v1/health").json() == {"status": "ok"}


def test_wrong_method(served):
    assert_error(served.client.get("/v1/embed"), 405, "method_not_allowed")


# -- build arguments and optional parts ------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ({"index": "x"}, "model: Field required"),
        ({"model": "m", "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"model": "m", "max_k": 0}, "max_k: Input should be greater than or equal to 1"),
        ({"model": "/no/such/model"}, "model: no such artifact"),
    ],
)
def test_bad_args_are_one_line(args, message):
    with pytest.raises(ServeArgsError, match=message) as err:
        build_app(args)
    assert "\n" not in str(err.value)


def test_classifier_without_head_and_foreign_index(artifacts, tmp_path):
    root = artifacts[0]
    tiny_model(tmp_path, 0, "headless")
    with pytest.raises(ServeArgsError, match="classifier: .* has no classification head"):
        build_app({"model": str(root / "model"), "classifier": str(tmp_path / "headless")})
    with pytest.raises(ServeArgsError, match="index: built from model"):
        build_app({"model": str(tmp_path / "headless"), "index": str(root / "index")})


def test_headless_app_404s_and_sheds_overload(served, tmp_path):
    # Last in the module: it replaces the shared app (two apps do not fit in 2 CPUs) on the
    # same, still running Serve instance; the fixture's stop_app removes it.
    serve.delete(APP_NAME)
    tiny_model(tmp_path, 0, "headless")
    # One request at a time in the embedder and one waiting: a burst must be shed with 503s.
    limits = {"max_ongoing_requests": 1, "max_queued_requests": 1, "batch_wait_timeout_s": 0.05}
    url = start_app(
        {"model": str(tmp_path / "headless"), **limits},
        port=int(served.url.rsplit(":", 1)[1]),
        timeout_s=START_TIMEOUT_S,
    )
    with httpx.Client(base_url=url, timeout=60.0) as client:
        assert_error(client.post("/v1/classify", files=multipart([PNG])), 404, "no_classifier")
        assert_error(client.post("/v1/search", json={"ids": ["x"]}), 404, "no_index")
        assert client.post("/v1/embed", files=multipart([PNG])).status_code == 200
        assert client.get("/v1/info").json()["index"] is None

        def embed(_):
            return client.post("/v1/embed", files=multipart([PNG] * 8))

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(embed, range(32)))  # bounded: 32 requests
        shed = [r for r in answers if r.status_code == 503]
        assert shed, "no request was shed with 503 under a burst 16x the capacity"
        for response in shed:  # shed by the full queue (not a 504 timeout), as a JSON error
            assert_error(response, 503, "overloaded")
        assert all(r.status_code == 200 for r in answers if r.status_code != 503)
        assert client.get("/v1/health").status_code == 200
        assert client.post("/v1/embed", files=multipart([PNG])).status_code == 200
