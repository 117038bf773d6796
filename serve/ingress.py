"""The HTTP ingress of the serve app: FastAPI routes under /v1 over the model and index deployments.

Built by `serve.app:build_app`, run by `serve.control.start_app`. Every request passes the
guard of serve.guard (auth, timeout, metrics, JSON errors). An index that fits one replica
is searched right here, on a copy kept in step with the retriever (serve.local_index), with
concurrent searches batched into one FAISS call; sharded indexes go through the retrievers.

    .venv/bin/python -m pytest -q tests/test_serve.py
    .venv/bin/python -m pytest -q tests/test_serve_live.py -k "auth or metrics"
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and
# FastAPI could not resolve string annotations against the unpickled functions' globals.

import asyncio
import json
import time
import uuid

import numpy as np
from fastapi import Query, Request
from fastapi.responses import Response
from ray import serve

from serve import auth, metrics, page  # noqa: F401  (page: the routes of the search page)
from serve.classes import knn_vote
from serve.errors import PrefixDimError
from serve.guard import ERRORS, api, call, cause
from serve.item_routes import ItemRoutes
from serve.local_index import LocalIndex
from serve.parsing import ApiError, query_vectors, read_query, resolve_k
from serve.schemas import (
    AppArgs,
    ClassesResponse,
    ClassifyMode,
    ClassifyRequest,
    ClassifyResponse,
    ClassRequest,
    EmbedRequest,
    EmbedResponse,
    HealthResponse,
    SearchRequest,
    SearchResponse,
    image_body_openapi,
)
from serve.search import has, hits, merge_hits, prefix_queries, run_search
from system.index import FilterError, IndexInputError

INFO_FIELD_MAX_CHARS = 2048  # /v1/info leaves out meta fields bigger than this (configs, histories)


def small_fields(meta: dict | None) -> dict | None:
    """`meta` without the fields too big for /v1/info (training configs, metrics histories)."""
    if meta is None:
        return None
    kept = {k: v for k, v in meta.items() if len(json.dumps(v, default=str)) <= INFO_FIELD_MAX_CHARS}
    return {**kept, "omitted_fields": sorted(set(meta) - set(kept))}


def _queries_in(items: list[tuple]) -> int:
    return sum(len(queries) for _, queries, _ in items)


# Many requests at once: the ingress mostly waits on the handles. Its queue is a last guard
# (Serve's router counts a burst awaiting assignment as queued), so it is long.
@serve.deployment(max_ongoing_requests=256, max_queued_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class RepforgeIngress(ItemRoutes):
    """HTTP routes; parses and validates requests, then calls the model, index and classes handles."""

    def __init__(
        self,
        embedder,
        classifier,
        retrievers: list,
        classes,
        args: dict,
        token_sha256: str | None,
        local_search: bool = False,
    ):
        self.embedder, self.classifier, self.retrievers, self.classes = (
            embedder,
            classifier,
            retrievers,
            classes,
        )
        self.args = AppArgs.model_validate(args)
        self.local = LocalIndex(retrievers[0]) if local_search and len(retrievers) == 1 else None
        self._local_batch.set_max_batch_size(max(64, self.args.max_images))  # >= one request's queries
        auth.configure(token_sha256, self.args.request_timeout_s)

    def deadline(self) -> float:
        # When `call` stops waiting out a version swap (409) or a dead replica (503). Half the
        # request timeout: the timeout itself (504) counts from the request's arrival.
        return time.monotonic() + self.args.request_timeout_s / 2

    async def embed_images(self, images: list[bytes], deadline: float) -> dict:
        out = await call(self.embedder.embed, images, deadline=deadline)
        metrics.observe_batches("embedder", out["batches"])
        return out

    async def index_infos(self) -> list[dict]:
        deadline = self.deadline()
        return await asyncio.gather(*(call(r.info, deadline=deadline) for r in self.retrievers))

    async def search_vectors(
        self, vectors: np.ndarray, k: int, fingerprint, deadline: float, dim=None, filter=None
    ) -> list:
        try:
            if self.local is not None:
                self.local.start()
                index = self.local.usable(fingerprint)
                if index is not None:
                    queries = prefix_queries(vectors, dim, index.manifest)
                    if filter is None:
                        return await self._local_batch((index, queries, k))
                    return hits(index, *run_search(index, queries, k, filter))
            replies = await asyncio.gather(
                *(
                    call(r.search, vectors, k, fingerprint, dim, filter, deadline=deadline)
                    for r in self.retrievers
                )
            )
        except PrefixDimError as err:
            raise ApiError(422, "invalid_dim", cause(err)) from None
        except FilterError as err:  # the index's filter parser: an unknown column, a bad value
            raise ApiError(422, "invalid_filter", cause(err)) from None
        except IndexInputError as err:  # e.g. a vector of the wrong dimension
            raise ApiError(422, "invalid_vector", cause(err)) from None
        return merge_hits([r["hits"] for r in replies], k, replies[0]["metric"])

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0, batch_size_fn=_queries_in)
    async def _local_batch(self, items: list[tuple]) -> list:
        # Concurrent searches of one copy: one FAISS call for all (it is much faster per query
        # in batches), cut back per request. Items from two versions of the copy (a sync in
        # between) are searched apart.
        out = [None] * len(items)
        for index in {id(ix): ix for ix, _, _ in items}.values():
            picks = [n for n, (ix, _, _) in enumerate(items) if ix is index]
            queries = np.concatenate([items[n][1] for n in picks])
            top = max(items[n][2] for n in picks)
            ids, scores = await self.local.search(index, queries, top)
            start = 0
            for n in picks:
                count, k = len(items[n][1]), items[n][2]
                rows = [row[:k] for row in ids[start : start + count]]
                out[n] = hits(index, rows, scores[start : start + count, :k])
                start += count
        return out

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
            index["searched_in_ingress"] = self.local is not None
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
                raise ApiError(404, "no_classes", cause(err)) from None
        else:
            self.need_index()
            hits_ = await self.search_vectors(out["vectors"], self.args.knn_k, out["model"], deadline)
            predictions = knn_vote(hits_, (await self.index_infos())[0].get("classes") or [], k)
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
        """Nearest indexed items of posted images, of query vectors, or of indexed ids; `filter`:
        only items whose metadata match it."""
        self.need_index()
        query = await read_query(request, SearchRequest, self.args)
        k, deadline = resolve_k(query.k, k, self.args.max_k), self.deadline()
        dim = dim if query.dim is None else query.dim
        if query.ids is not None and query.images:  # multipart (JSON's schema refuses it itself)
            raise ApiError(422, "validation_error", "give exactly one of images, vectors or ids")
        if query.ids is not None:
            return {"results": await self.search_ids(query.ids, k, deadline, dim, query.filter)}
        if query.vectors is not None:
            vectors = query_vectors(query.vectors)
            return {"results": await self.search_vectors(vectors, k, None, deadline, dim, query.filter)}
        out = await self.embed_images(query.images, deadline)
        found = await self.search_vectors(out["vectors"], k, out["model"], deadline, dim, query.filter)
        return {"results": found, "model": out["model"]}

    async def search_ids(self, ids: list[str], k: int, deadline: float, dim=None, filter=None) -> list:
        try:
            index = self.local.usable(None) if self.local is not None else None
            if index is not None and all(has(index, i) for i in ids):  # else: added a moment ago?
                rows = [index.reconstruct(ids)]
            elif len(self.retrievers) == 1:
                return await call(self.retrievers[0].search_by_id, ids, k, dim, filter, deadline=deadline)
            else:
                owners = await self.owners(ids, deadline)
                unknown = [i for i in ids if i not in owners]
                if unknown:
                    raise IndexInputError(f"unknown ids: {unknown[:5]}")
                rows = await asyncio.gather(
                    *(call(self.retrievers[owners[i]].vectors, [i], deadline=deadline) for i in ids)
                )
        except PrefixDimError as err:
            raise ApiError(422, "invalid_dim", cause(err)) from None
        except FilterError as err:
            raise ApiError(422, "invalid_filter", cause(err)) from None
        except IndexInputError as err:
            raise ApiError(404, "unknown_id", cause(err)) from None
        return await self.search_vectors(np.concatenate(rows), k, None, deadline, dim, filter)

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
