"""The HTTP ingress of the serve app: FastAPI routes under /v1 over the model and index deployments.

Built and run by `serve.app` (`build_app`, `start_app`). Every request passes one
middleware (bearer-token auth, a request timeout, Prometheus metrics); every error leaves
as `{"error": {"code", "message"}}`: 4xx for bad input, 503 when a deployment's queue is
full (backpressure) or no replica answers, 504 past the request timeout.

    .venv/bin/python -m pytest -q tests/test_serve.py
    .venv/bin/python -m pytest -q tests/test_serve_live.py -k "auth or metrics"
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and
# FastAPI could not resolve string annotations against the unpickled functions' globals.

import asyncio
import json
import time
import uuid
import zlib

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.exceptions import HTTPException

from serve import auth, metrics
from serve.classes import knn_vote
from serve.deployments import InvalidImage, PrefixDimError, VersionMismatch
from serve.parsing import ApiError, pydantic_message, query_vectors, read_query, resolve_k
from serve.schemas import (
    AppArgs,
    ClassesResponse,
    ClassifyMode,
    ClassifyRequest,
    ClassifyResponse,
    ClassRequest,
    DeleteItemsRequest,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    ItemsRequest,
    ItemsResponse,
    SearchRequest,
    SearchResponse,
    image_body_openapi,
)
from system.index import IndexInputError

INFO_FIELD_MAX_CHARS = 2048  # /v1/info leaves out meta fields bigger than this (configs, histories)
RETRIES = 3  # a replica that died mid-request: the call is retried on another (every call is idempotent)
ROUTES = {"/v1/embed", "/v1/classify", "/v1/search", "/v1/items", "/v1/classes", "/v1/info", "/v1/health"}


def _error(status: int, code: str, message: str) -> JSONResponse:
    metrics.observe_error(code)
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


api = FastAPI(
    title="repforge",
    version="1",
    description="Embed, classify and search images with a repforge model artifact and FAISS index. "
    "Send `Authorization: Bearer TOKEN` when the app has a token.",
)
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 415, 422, 503, 504)}


class Guard:
    """Auth, the request timeout and metrics, for every route (exception handlers see none of these).

    Plain ASGI middleware: Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) hands
    every request and response through extra memory streams and a task group.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request = Request(scope)
        route = request.url.path if request.url.path in ROUTES else "other"
        status, counted = None, False

        def count(code: int) -> None:
            nonlocal counted
            if not counted:
                counted = True
                metrics.observe_request(route, request.method, code, time.perf_counter() - started)

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count(status)  # before the last bytes leave: whoever has the answer finds it counted
            await send(message)

        if not auth.authorized(
            request.url.path, request.headers.get("authorization"), auth.RUNTIME["token_sha256"]
        ):
            response = _error(401, "unauthorized", "send the API token as 'Authorization: Bearer TOKEN'")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, counting_send)
            return
        try:
            await asyncio.wait_for(self.app(scope, receive, counting_send), auth.RUNTIME["timeout_s"])
        except asyncio.TimeoutError:
            if status is not None:  # too late for a 504: the response has begun
                count(status)
                raise
            response = _error(504, "timeout", f"no answer within {auth.RUNTIME['timeout_s']} s")
            await response(scope, receive, counting_send)
        except Exception:  # a bug: counted here, answered by the 500 handler
            count(500)
            raise
        count(status or 500)  # a response that never finished its body (the client left)


api.add_middleware(Guard)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return _error(err.status, err.code, err.message)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    # Routing errors (unknown path, wrong method) get the same shape as ours.
    codes = {404: "not_found", 405: "method_not_allowed"}
    return _error(err.status_code, codes.get(err.status_code, "http_error"), str(err.detail))


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    # A bug, not bad input; still the same shape (Starlette logs the traceback).
    return _error(500, "internal_error", f"internal error ({type(err).__name__}); see the server log")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return _error(422, "validation_error", pydantic_message(err.errors()))


def small_fields(meta: dict | None) -> dict | None:
    """`meta` without the fields too big for /v1/info (training configs, metrics histories)."""
    if meta is None:
        return None
    kept = {k: v for k, v in meta.items() if len(json.dumps(v, default=str)) <= INFO_FIELD_MAX_CHARS}
    return {**kept, "omitted_fields": sorted(set(meta) - set(kept))}


def _cause(err: Exception) -> str:
    # Errors raised in a replica arrive wrapped; the message of the original is the useful part.
    return str(getattr(err, "cause", None) or err).splitlines()[-1]


async def call(method, *args, deadline: float):
    """One handle call: backpressure -> 503, a dead replica -> retried, a version race -> waited out."""
    failures = 0
    while True:
        try:
            return await method.remote(*args)
        except BackPressureError:
            raise ApiError(503, "overloaded", "the server is at capacity; retry later") from None
        except InvalidImage as err:
            raise ApiError(400, "invalid_image", _cause(err)) from None
        except VersionMismatch as err:
            # A swap is half applied (the model moved, the index not yet): it settles in seconds.
            if time.monotonic() > deadline:
                raise ApiError(409, "version_mismatch", _cause(err)) from None
            await asyncio.sleep(0.1)
        except (RayActorError, ReplicaUnavailableError) as err:
            failures += 1
            if failures > RETRIES:
                raise ApiError(503, "unavailable", f"no replica answered: {_cause(err)}") from None
            await asyncio.sleep(0.05 * 2**failures)


def merge_hits(per_shard: list[list[list[dict]]], k: int, metric: str) -> list[list[dict]]:
    """Exact top-k over shards: each shard's top-k holds every hit of the global top-k it owns."""
    if len(per_shard) == 1:
        return per_shard[0]
    best_first = metric != "l2"  # inner product: higher is better; L2 distance: lower
    return [
        sorted((h for rows in query for h in rows), key=lambda h: h["score"], reverse=best_first)[:k]
        for query in zip(*per_shard, strict=True)
    ]


# Many requests at once: the ingress mostly waits on the handles. Its queue is a last guard
# (Serve's router counts a burst awaiting assignment as queued), so it is long.
@serve.deployment(max_ongoing_requests=256, max_queued_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class RepforgeIngress:
    """HTTP routes; parses and validates requests, then calls the model, index and classes handles."""

    def __init__(self, embedder, classifier, retrievers: list, classes, args: dict, token_sha256: str | None):
        self.embedder, self.classifier, self.retrievers, self.classes = (
            embedder,
            classifier,
            retrievers,
            classes,
        )
        self.args = AppArgs.model_validate(args)
        auth.configure(token_sha256, self.args.request_timeout_s)

    def deadline(self) -> float:
        # When `call` stops waiting out a version swap (409). Half the request timeout: the
        # timeout itself (504) counts from the request's arrival, before the body was read.
        return time.monotonic() + self.args.request_timeout_s / 2

    async def embed_images(self, images: list[bytes], deadline: float) -> dict:
        out = await call(self.embedder.embed, images, deadline=deadline)
        metrics.observe_batches("embedder", out["batches"])
        return out

    async def index_infos(self) -> list[dict]:
        deadline = self.deadline()
        return await asyncio.gather(*(call(r.info, deadline=deadline) for r in self.retrievers))

    async def search_vectors(
        self, vectors: np.ndarray, k: int, fingerprint, deadline: float, dim: int | None = None
    ) -> list:
        try:
            replies = await asyncio.gather(
                *(call(r.search, vectors, k, fingerprint, dim, deadline=deadline) for r in self.retrievers)
            )
        except PrefixDimError as err:
            raise ApiError(422, "invalid_dim", _cause(err)) from None
        except IndexInputError as err:  # e.g. a vector of the wrong dimension
            raise ApiError(422, "invalid_vector", _cause(err)) from None
        return merge_hits([r["hits"] for r in replies], k, replies[0]["metric"])

    async def owners(self, ids: list[str], deadline: float) -> dict[str, int]:
        """Which shard holds each indexed id (absent ids are left out)."""
        held = await asyncio.gather(*(call(r.present, ids, deadline=deadline) for r in self.retrievers))
        return {i: shard for shard, ids_ in enumerate(held) for i in ids_}

    def need_index(self) -> None:
        if not self.retrievers:
            raise ApiError(404, "no_index", "this app serves no index")

    @api.get("/v1/health", response_model=HealthResponse)
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/metrics", include_in_schema=False)
    async def prometheus(self) -> Response:
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    @api.get("/v1/info")
    async def info(self) -> dict:
        """Model meta (without its large fields), the classifier's when separate, the index manifest(s)."""
        deadline = self.deadline()
        index = None
        if self.retrievers:
            infos = await self.index_infos()
            index = small_fields({**infos[0], "count": sum(i["count"] for i in infos)})
            if len(infos) > 1:  # each shard's own manifest (added after small_fields: it is long)
                index["shards"] = [small_fields(i) for i in infos]
        classifier = None
        if self.classifier is not None and self.classifier is not self.embedder:
            classifier = small_fields(await call(self.classifier.info, deadline=deadline))
        return {
            "model": small_fields(await call(self.embedder.info, deadline=deadline)),
            "classifier": classifier,
            "index": index,
            "limits": self.args.model_dump(exclude={"model", "index", "classifier", "classes", "token_file"}),
        }

    @api.post(
        "/v1/embed",
        response_model=EmbedResponse,
        responses=ERRORS,
        openapi_extra=image_body_openapi(EmbedRequest),
    )
    async def embed(self, request: Request) -> dict:
        """Embeddings of the posted images (L2-normalised when the model says so)."""
        query = await read_query(request, EmbedRequest, self.args)
        out = await self.embed_images(query.images, self.deadline())
        return {"embeddings": out["vectors"].tolist(), "dim": out["vectors"].shape[1], "model": out["model"]}

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        openapi_extra=image_body_openapi(ClassifyRequest),
    )
    async def classify(
        self,
        request: Request,
        k: int = Query(5, description="labels per image"),
        mode: ClassifyMode = Query("head", description="head, prototype (live classes) or knn (index vote)"),
    ) -> dict:
        """Top-k labels of the posted images: the fine-tuned head, live class prototypes, or a kNN vote."""
        query = await read_query(request, ClassifyRequest, self.args)
        k, mode, deadline = resolve_k(query.k, k, self.args.max_k), query.mode or mode, self.deadline()
        if mode == "head":
            if self.classifier is None:
                raise ApiError(404, "no_classifier", "this app serves no model with a classification head")
            out = await call(self.classifier.classify, query.images, k, deadline=deadline)
            metrics.observe_batches("classifier", out["batches"])
            return {"predictions": out["predictions"], "mode": mode, "model": out["model"]}
        out = await self.embed_images(query.images, deadline)
        if mode == "prototype":
            try:
                predictions = await call(
                    self.classes.classify, out["vectors"], out["model"], k, deadline=deadline
                )
            except LookupError as err:
                raise ApiError(404, "no_classes", _cause(err)) from None
        else:
            self.need_index()
            hits = await self.search_vectors(out["vectors"], self.args.knn_k, out["model"], deadline)
            predictions = knn_vote(hits, (await self.index_infos())[0].get("classes") or [], k)
        return {"predictions": predictions, "mode": mode, "model": out["model"]}

    @api.post(
        "/v1/search",
        response_model=SearchResponse,
        responses=ERRORS,
        openapi_extra=image_body_openapi(SearchRequest),
    )
    async def search(
        self,
        request: Request,
        k: int = Query(10, description="hits per query"),
        dim: int | None = Query(
            None, description="Matryoshka prefix: score on the first dim dimensions (a trained dim)"
        ),
    ) -> dict:
        """Nearest indexed items of posted images, of query vectors, or of indexed ids."""
        self.need_index()
        query = await read_query(request, SearchRequest, self.args)
        k, deadline = resolve_k(query.k, k, self.args.max_k), self.deadline()
        dim = dim if query.dim is None else query.dim
        if query.ids is not None and query.images:  # multipart (JSON's schema refuses it itself)
            raise ApiError(422, "validation_error", "give exactly one of images, vectors or ids")
        if query.ids is not None:
            return {"results": await self.search_ids(query.ids, k, deadline, dim)}
        if query.vectors is not None:
            vectors = query_vectors(query.vectors)
            return {"results": await self.search_vectors(vectors, k, None, deadline, dim)}
        out = await self.embed_images(query.images, deadline)
        return {
            "results": await self.search_vectors(out["vectors"], k, out["model"], deadline, dim),
            "model": out["model"],
        }

    async def search_ids(self, ids: list[str], k: int, deadline: float, dim: int | None = None) -> list:
        try:
            if len(self.retrievers) == 1:
                return await call(self.retrievers[0].search_by_id, ids, k, dim, deadline=deadline)
            owners = await self.owners(ids, deadline)
            unknown = [i for i in ids if i not in owners]
            if unknown:
                raise IndexInputError(f"unknown ids: {unknown[:5]}")
            rows = await asyncio.gather(
                *(call(self.retrievers[owners[i]].vectors, [i], deadline=deadline) for i in ids)
            )
        except PrefixDimError as err:
            raise ApiError(422, "invalid_dim", _cause(err)) from None
        except IndexInputError as err:
            raise ApiError(404, "unknown_id", _cause(err)) from None
        return await self.search_vectors(np.concatenate(rows), k, None, deadline, dim)

    @api.post(
        "/v1/items",
        response_model=ItemsResponse,
        responses=ERRORS,
        openapi_extra=image_body_openapi(ItemsRequest),
    )
    async def add_items(self, request: Request) -> dict:
        """Add images to the live index under the given ids (an existing id is replaced); persisted."""
        self.need_index()
        query = await read_query(request, ItemsRequest, self.args)
        ids = query.ids or []
        if len(ids) != len(query.images) or len(set(ids)) != len(ids):
            raise ApiError(422, "validation_error", "ids: one unique id per image ('id' fields in multipart)")
        deadline = self.deadline()
        out = await self.embed_images(query.images, deadline)
        owners = await self.owners(ids, deadline)
        # A new id goes to a shard chosen by a stable hash of it; an existing one stays where it is.
        shard_of = [owners.get(i, zlib.crc32(i.encode()) % len(self.retrievers)) for i in ids]
        done = []
        try:
            for shard in sorted(set(shard_of)):
                picks = [n for n, s in enumerate(shard_of) if s == shard]
                meta = [query.metadata[n] for n in picks] if query.metadata else None
                done.append(
                    await call(
                        self.retrievers[shard].upsert,
                        [ids[n] for n in picks],
                        out["vectors"][picks],
                        meta,
                        out["model"],
                        deadline=deadline,
                    )
                )
        except IndexInputError as err:
            raise ApiError(422, "invalid_item", _cause(err)) from None
        replaced = sum(d["replaced"] for d in done)
        return {"added": len(ids) - replaced, "replaced": replaced, "count": await self.count(deadline)}

    @api.delete("/v1/items", response_model=ItemsResponse, responses=ERRORS)
    async def remove_items(self, request: Request) -> dict:
        """Remove ids from the live index (JSON `{"ids": [...]}`), persisted; unknown ids: 404, none go."""
        self.need_index()
        query = await read_query(request, DeleteItemsRequest, self.args)
        deadline = self.deadline()
        owners = await self.owners(query.ids, deadline)
        unknown = [i for i in query.ids if i not in owners]
        if unknown:
            raise ApiError(404, "unknown_id", f"unknown ids: {unknown[:5]}")
        removed = 0
        try:
            for shard in sorted(set(owners.values())):
                picks = [i for i, s in owners.items() if s == shard]
                removed += (await call(self.retrievers[shard].remove, picks, deadline=deadline))["removed"]
        except IndexInputError as err:  # e.g. on-disk indexes are read-only
            raise ApiError(422, "invalid_item", _cause(err)) from None
        return {"added": 0, "replaced": 0, "removed": removed, "count": await self.count(deadline)}

    async def count(self, deadline: float) -> int:
        return sum(i["count"] for i in await self.index_infos())

    async def fingerprint(self, deadline: float) -> str:
        return (await call(self.embedder.info, deadline=deadline))["fingerprint"]

    @api.get("/v1/classes", response_model=ClassesResponse, responses=ERRORS)
    async def list_classes(self) -> dict:
        """The live classes of the served model."""
        fingerprint = await self.fingerprint(self.deadline())
        return {
            "model": fingerprint,
            "classes": await call(self.classes.list, fingerprint, deadline=self.deadline()),
        }

    @api.post(
        "/v1/classes",
        response_model=ClassesResponse,
        responses=ERRORS,
        openapi_extra=image_body_openapi(ClassRequest),
    )
    async def add_class(self, request: Request) -> dict:
        """Add (or refine) a live class from example images: `name` and images; no retraining."""
        query = await read_query(request, ClassRequest, self.args)
        if not query.name or len(query.name) > 200:
            raise ApiError(422, "validation_error", "name: a class name of 1 to 200 characters is required")
        deadline = self.deadline()
        out = await self.embed_images(query.images, deadline)
        change = uuid.uuid4().hex  # the same on retries: a lost reply does not add the examples twice
        classes = await call(
            self.classes.add, query.name, out["vectors"], out["model"], change, deadline=deadline
        )
        return {"model": out["model"], "classes": classes}

    @api.delete("/v1/classes", response_model=ClassesResponse, responses=ERRORS)
    async def remove_class(self, name: str = Query(description="the class to remove")) -> dict:
        """Remove a live class of the served model."""
        deadline = self.deadline()
        fingerprint = await self.fingerprint(deadline)
        change = uuid.uuid4().hex  # the same on retries: a lost reply is no 404 on the retry
        if not await call(self.classes.remove, name, fingerprint, change, deadline=deadline):
            raise ApiError(404, "unknown_class", f"no live class {name!r} for model {fingerprint}")
        return {
            "model": fingerprint,
            "classes": await call(self.classes.list, fingerprint, deadline=deadline),
        }
