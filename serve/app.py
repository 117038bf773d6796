"""The repforge Ray Serve application: an HTTP ingress over the embedder and the retriever.

    serve run deploy.yaml                                   # the config file
    repforge serve --model runs/quickstart/finetune/model --index runs/quickstart/index
    python -c "import ray; from serve.app import start_app; ray.init(); print(start_app({'model': ...}))"

API (OpenAPI at /docs): POST /v1/embed, /v1/classify, /v1/search; GET /v1/health, /v1/info.
Images come as multipart parts named `image` or JSON `{"images": [base64, ...]}`. The
ingress validates everything (size, count, decodability, k, vectors) before any replica
sees it, and every error leaves as `{"error": {"code", "message"}}` with a 4xx status.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and
# FastAPI could not resolve string annotations against the unpickled functions' globals.

import asyncio
import base64
import binascii
import json
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from serve.deployments import EmbedderDeployment, RetrieverDeployment
from serve.schemas import (
    AppArgs,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    SearchRequest,
    SearchResponse,
    image_body_openapi,
)
from system import storage
from system.data import check_image
from system.index import MANIFEST_FILE, IndexInputError
from system.models import ModelError, read_meta

APP_NAME = "repforge"
INFO_FIELD_MAX_CHARS = 2048  # /v1/info leaves out meta fields bigger than this (configs, histories)


class ServeArgsError(ValueError):
    """A bad build argument: the message is one line naming the argument."""


class ApiError(Exception):
    """A client error, turned into the JSON error shape by the app's exception handler."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _pydantic_message(errors) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)


api = FastAPI(
    title="repforge",
    version="1",
    description="Embed, classify and search images with a repforge model artifact and FAISS index.",
)
ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 422)}


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
    return _error(422, "validation_error", _pydantic_message(err.errors()))


# -- request parsing ------------------------------------------------------------------


@dataclass
class ParsedQuery:
    images: list[bytes] | None = None
    vectors: list[list[float]] | None = None
    ids: list[str] | None = None
    k: int | None = None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused as soon as it is known to exceed `max_bytes`."""
    too_large = ApiError(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():  # chunked uploads carry no content-length
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


async def parse_multipart(request: Request, body: bytes, max_images: int) -> list[bytes]:
    async def replay():
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=max_images, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if err.message.startswith("Too many files"):
            raise ApiError(413, "too_many_images", f"at most {max_images} images per request") from None
        raise ApiError(400, "invalid_multipart", err.message) from None
    except ValueError as err:  # python-multipart's parse errors
        raise ApiError(400, "invalid_multipart", str(err)) from None
    try:
        images = []
        for part in form.getlist("image"):
            if not isinstance(part, UploadFile):
                raise ApiError(400, "invalid_image", "part 'image' must be a file (send it with a filename)")
            images.append(await part.read())
    finally:
        await form.close()
    if not images:
        raise ApiError(422, "validation_error", "image: multipart body needs one or more parts named 'image'")
    return images


def decode_base64(text: str, position: int) -> bytes:
    if text.startswith("data:"):  # data URLs, as browsers produce them
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"images.{position}: not valid base64") from None


def parse_json(body: bytes, schema) -> ParsedQuery:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {err}") from None
    try:
        request = schema.model_validate(payload)
    except ValidationError as err:
        raise ApiError(422, "validation_error", _pydantic_message(err.errors())) from None
    images = getattr(request, "images", None)
    return ParsedQuery(
        images=[decode_base64(text, i) for i, text in enumerate(images)] if images is not None else None,
        vectors=getattr(request, "vectors", None),
        ids=getattr(request, "ids", None),
        k=getattr(request, "k", None),
    )


async def read_query(request: Request, schema, args: AppArgs) -> ParsedQuery:
    """Body -> validated query: within limits, every image decodable (so replicas never see a bad one)."""
    body = await read_body(request, args.max_body_bytes)
    if not body:
        raise ApiError(400, "empty_body", "empty body: send multipart parts named 'image' or a JSON object")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        query = ParsedQuery(images=await parse_multipart(request, body, args.max_images))
    elif media_type == "application/json" or media_type.endswith("+json"):
        query = parse_json(body, schema)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {media_type or '(none)'!r}: use multipart/form-data or application/json",
        )
    for name in ("images", "vectors", "ids"):
        items = getattr(query, name)
        if items is not None and len(items) > args.max_images:
            raise ApiError(
                413, f"too_many_{name}", f"{len(items)} {name}: at most {args.max_images} per request"
            )
    if query.images is not None:
        # A full decode, off the event loop: truncated payloads only fail there.
        reasons = await asyncio.to_thread(lambda: [check_image(data) for data in query.images])
        for i, reason in enumerate(reasons):
            if reason is not None:
                raise ApiError(400, "invalid_image", f"image {i}: {reason}")
    return query


def resolve_k(body_k: int | None, query_k: int, max_k: int) -> int:
    k = query_k if body_k is None else body_k
    if not 1 <= k <= max_k:
        raise ApiError(422, "invalid_k", f"k: must be between 1 and {max_k}, got {k}")
    return k


def query_vectors(vectors: list[list[float]], dim: int) -> np.ndarray:
    lengths = {len(v) for v in vectors}
    if lengths != {dim}:
        raise ApiError(
            422, "invalid_vector", f"vectors: every vector needs {dim} values, got {sorted(lengths)}"
        )
    array = np.asarray(vectors, dtype=np.float32)
    if not np.isfinite(array).all():  # finite doubles can still overflow float32
        raise ApiError(422, "invalid_vector", "vectors: values must be finite float32 numbers")
    return array


def small_fields(meta: dict | None) -> dict | None:
    """`meta` without the fields too big for /v1/info (training configs, metrics histories)."""
    if meta is None:
        return None
    kept = {k: v for k, v in meta.items() if len(json.dumps(v, default=str)) <= INFO_FIELD_MAX_CHARS}
    return {**kept, "omitted_fields": sorted(set(meta) - set(kept))}


def _cause(err: Exception) -> str:
    # Errors raised in a replica arrive wrapped; the message of the original is the useful part.
    return str(getattr(err, "cause", None) or err)


# -- the ingress ----------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class RepforgeIngress:
    """HTTP routes; parses and validates requests, then calls the embedder / retriever handles."""

    def __init__(self, embedder, classifier, retriever, args: dict, model_meta: dict, classifier_meta):
        self.embedder, self.classifier, self.retriever = embedder, classifier, retriever
        self.args = AppArgs.model_validate(args)
        self.model_meta, self.classifier_meta = model_meta, classifier_meta
        self._index_info: dict | None = None

    async def index_info(self) -> dict:
        if self._index_info is None:
            self._index_info = await self.retriever.info.remote()
        return self._index_info

    @api.get("/v1/health", response_model=HealthResponse)
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info")
    async def info(self) -> dict:
        """Model meta (without its large fields), the classifier's when separate, the index manifest."""
        return {
            "model": small_fields(self.model_meta),
            "classifier": small_fields(self.classifier_meta),
            "index": small_fields(await self.index_info()) if self.retriever is not None else None,
            "limits": self.args.model_dump(exclude={"model", "index", "classifier"}),
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
        vectors = await self.embedder.embed.remote(query.images)
        return {
            "embeddings": vectors.tolist(),
            "dim": vectors.shape[1],
            "model": self.model_meta["fingerprint"],
        }

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        openapi_extra=image_body_openapi(ClassifyRequest),
    )
    async def classify(self, request: Request, k: int = Query(5, description="labels per image")) -> dict:
        """Top-k class labels of the posted images, with softmax probabilities."""
        if self.classifier is None:
            raise ApiError(404, "no_classifier", "this app serves no model with a classification head")
        query = await read_query(request, ClassifyRequest, self.args)
        k = resolve_k(query.k, k, self.args.max_k)
        return {"predictions": await self.classifier.classify.remote(query.images, k)}

    @api.post(
        "/v1/search",
        response_model=SearchResponse,
        responses=ERRORS,
        openapi_extra=image_body_openapi(SearchRequest),
    )
    async def search(self, request: Request, k: int = Query(10, description="hits per query")) -> dict:
        """Nearest indexed items of posted images, of query vectors, or of indexed ids."""
        if self.retriever is None:
            raise ApiError(404, "no_index", "this app serves no index")
        query = await read_query(request, SearchRequest, self.args)
        k = resolve_k(query.k, k, self.args.max_k)
        if query.ids is not None:
            try:
                return {"results": await self.retriever.search_by_id.remote(query.ids, k)}
            except IndexInputError as err:
                raise ApiError(404, "unknown_id", _cause(err)) from None
        if query.vectors is not None:
            vectors = query_vectors(query.vectors, (await self.index_info())["dim"])
        else:
            vectors = await self.embedder.embed.remote(query.images)
        return {"results": await self.retriever.search.remote(vectors, k)}


# -- building and running -------------------------------------------------------------


def parse_args(args: AppArgs | dict) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args)
    except ValidationError as err:
        raise ServeArgsError(f"serve args: {_pydantic_message(err.errors())}") from None


def _artifact_meta(name: str, uri: str) -> dict:
    try:
        return read_meta(uri)
    except (ModelError, storage.StorageError, OSError) as err:
        raise ServeArgsError(f"{name}: {err}") from None


def resolve_args(args: AppArgs | dict) -> tuple[AppArgs, dict, str | None, dict | None]:
    """Validate the args and read the artifacts' metadata (no Ray needed). Raises ServeArgsError.

    Returns (args with absolute URIs, model meta, classifier URI or None, classifier meta or None).
    """
    cfg = parse_args(args)
    cfg = cfg.model_copy(
        update={
            key: storage.normalize(getattr(cfg, key))
            for key in ("model", "index", "classifier")
            if getattr(cfg, key)
        }
    )
    model_meta = _artifact_meta("model", cfg.model)
    classifier_uri, classifier_meta = None, None
    if cfg.classifier and cfg.classifier != cfg.model:
        classifier_uri, classifier_meta = cfg.classifier, _artifact_meta("classifier", cfg.classifier)
        if not classifier_meta.get("num_classes"):
            raise ServeArgsError(f"classifier: {cfg.classifier} has no classification head")
    elif model_meta.get("num_classes"):
        classifier_uri = cfg.model
    elif cfg.classifier:
        raise ServeArgsError(f"classifier: {cfg.classifier} has no classification head")
    if cfg.index:
        _check_index(cfg.index, model_meta)
    return cfg, model_meta, classifier_uri, classifier_meta


def build_app(args: AppArgs | dict) -> serve.Application:
    """The application graph: ingress -> embedder (+ classifier) and retriever. Raises ServeArgsError."""
    cfg, model_meta, classifier_uri, classifier_meta = resolve_args(args)

    # Ask for a GPU only where the cluster has one; otherwise the replica would never be placed.
    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    options = {
        "max_ongoing_requests": max(64, 2 * cfg.max_batch_size),  # room for full batches
        "ray_actor_options": {"num_cpus": 1, **({"num_gpus": 1} if has_gpu else {})},
    }
    batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
    embedder = EmbedderDeployment.options(**options).bind(cfg.model, **batching)
    classifier = None
    if classifier_uri == cfg.model:
        classifier = embedder
    elif classifier_uri:
        classifier = EmbedderDeployment.options(name="ClassifierDeployment", **options).bind(
            classifier_uri, **batching
        )
    retriever = RetrieverDeployment.bind(cfg.index) if cfg.index else None
    return RepforgeIngress.bind(
        embedder, classifier, retriever, cfg.model_dump(), model_meta, classifier_meta
    )


def _check_index(uri: str, model_meta: dict) -> None:
    """Refuse an index built from another model's embeddings: image queries would be meaningless.

    Reads only the manifest: the replica is the one that loads the (possibly large) index.
    """
    fs, path = storage.filesystem(storage.join(uri, MANIFEST_FILE))
    try:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        raise ServeArgsError(f"index: not an index (no readable {MANIFEST_FILE}): {uri}") from None
    # The same rule as system.index.check_fingerprint, applied before any replica starts.
    built_from, model = manifest.get("fingerprint"), model_meta.get("fingerprint")
    if built_from and model and built_from != model:
        raise ServeArgsError(f"index: built from model {built_from}, but model {model} is served")


_owns_serve = False  # whether start_app started Serve (and so stop_app shuts it down)


def start_app(
    args: AppArgs | dict, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 180.0
) -> str:
    """Deploy the app on the current Ray cluster (ray.init() when none); returns its base URL.

    Waits at most `timeout_s` for the replicas and then for /v1/health to answer.
    """
    global _owns_serve
    cfg = resolve_args(args)[0]  # before any Ray work: a bad arg or artifact fails fast
    if not ray.is_initialized():
        ray.init()
    app = build_app(cfg)
    _owns_serve = _owns_serve or not serve.status().proxies
    serve.start(http_options={"host": host, "port": port})
    deadline = time.monotonic() + timeout_s
    _deploy(app, timeout_s)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    _wait_healthy(url, deadline)
    return url


def _deploy(app: serve.Application, timeout_s: float) -> None:
    """serve.run, bounded: it would wait forever for replicas that never get placed (too few CPUs/GPUs)."""
    outcome: dict = {}

    def run():
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    # A daemon thread, so a deployment that never finishes cannot keep the process alive.
    thread = threading.Thread(target=run, name="repforge-deploy", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" in outcome:
        raise outcome["error"]
    if thread.is_alive():
        status = serve.status().applications.get(APP_NAME)
        states = status.deployments if status else {}
        detail = "; ".join(f"{name}: {d.status} {d.message}".strip() for name, d in states.items())
        raise RuntimeError(f"the serve app was not running after {timeout_s:.0f} s ({detail})")


def _wait_healthy(url: str, deadline: float) -> None:
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the serve app did not answer {url}/v1/health in time")


def stop_app() -> None:
    """Delete the app; shut Serve down too when start_app was the one that started it."""
    global _owns_serve
    if not ray.is_initialized():
        return
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    if _owns_serve:
        serve.shutdown()
        _owns_serve = False
