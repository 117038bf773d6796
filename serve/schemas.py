"""Typed shapes of the serve application: its build arguments and the /v1 HTTP API.

`AppArgs` is what `serve.app:build_app` accepts (from `deploy.yaml`, `repforge serve`
or `start_app`); the request and response models document the API at /docs and
validate JSON bodies. Every error leaves the app as `ErrorResponse`.

    .venv/bin/python -m pytest -q tests/test_serve.py -k "bad_args or info_and_docs"
    .venv/bin/python -m pytest -q tests/test_cli.py -k serve_flags
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# JSON allows no NaN/inf, but Python clients send them anyway: refuse them at the edge.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# head: the fine-tuned linear head; prototype: nearest class mean of the live classes;
# knn: a vote of the nearest indexed items' labels. All three use the same embeddings.
ClassifyMode = Literal["head", "prototype", "knn"]


class AppArgs(BaseModel):
    """Arguments of `build_app`; every field doubles as `repforge serve --help` text."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model artifact URI used for /v1/embed and image queries of /v1/search")
    index: str | list[str] | None = Field(
        None,
        description="index folder URI for /v1/search, or a list of index shards (one retriever "
        "deployment each, exact top-k merge); omit to serve no index",
    )
    classifier: str | None = Field(
        None,
        description="model artifact with a classification head for /v1/classify "
        "(default: the model itself when it has a head)",
    )
    classes: str | None = Field(
        None, description="JSON file URI where live classes (prototypes) persist; omit to keep them in memory"
    )
    compat: str | None = Field(
        None,
        description="compatibility report (repforge compat check) that lets the model search an index "
        "built from another model, for exactly that pair (docs/upgrades.md)",
    )
    token_file: str | None = Field(
        None,
        description="file holding the API bearer token (default: the REPFORGE_API_TOKEN environment "
        "variable; neither: no auth)",
    )
    max_batch_size: int = Field(32, ge=1, description="most images in one batched forward pass")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="how long a batch waits for more images before it runs"
    )
    max_k: int = Field(100, ge=1, description="largest k a client may ask for")
    knn_k: int = Field(10, ge=1, description="neighbours that vote in /v1/classify?mode=knn")
    max_images: int = Field(64, ge=1, description="most images (or query vectors / ids) in one request")
    max_body_bytes: int = Field(20_000_000, ge=1, description="largest request body accepted, in bytes")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="most pixels per image, checked from the header before decoding"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="a request still running after this gets 504")
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests a model/index replica works on at once (batches fill from these)"
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting per deployment beyond that before 503 (-1: unbounded)"
    )
    embedder_replicas: int = Field(1, ge=1, description="embedder replicas (deploy.yaml may autoscale)")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas (each parses, and may search)")
    ingress_search: str = Field(  # str, not Literal: `repforge serve` makes a flag of each field
        "auto",
        pattern="^(auto|on|off)$",
        description="search a one-shard index inside the ingress replicas (no hop to the retriever): "
        "auto when its files are under ingress_search_max_bytes",
    )
    ingress_search_max_bytes: int = Field(
        2_000_000_000, ge=0, description="largest index (its FAISS files) auto searches in the ingress"
    )
    replica_cpus: float = Field(1.0, ge=0, description="CPUs reserved per embedder replica")
    persist_items: bool = Field(True, description="save the index after each /v1/items change")
    access_log: bool = Field(
        True,
        description="Ray Serve's per-request access log lines (off: no latency change measured, "
        "bench_serve.py `quiet`; errors are logged either way)",
    )


# -- requests -------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Request):
    images: list[str] = Field(min_length=1, description="base64-encoded JPEG/PNG/WebP images")


class ClassifyRequest(EmbedRequest):
    k: int | None = Field(None, description="labels per image (overrides the query parameter)")
    mode: ClassifyMode | None = Field(None, description="classifier (overrides the query parameter)")


class ItemsRequest(_Request):
    ids: list[str] = Field(min_length=1, description="item ids; an id already indexed is replaced (upsert)")
    images: list[str] = Field(min_length=1, description="base64-encoded images, one per id")
    metadata: list[dict[str, Any]] | None = Field(None, description="passthrough columns, one per id")

    @model_validator(mode="after")
    def _aligned(self) -> "ItemsRequest":
        if len(self.images) != len(self.ids) or (
            self.metadata is not None and len(self.metadata) != len(self.ids)
        ):
            raise ValueError("ids, images (and metadata) need the same length")
        return self


class DeleteItemsRequest(_Request):
    ids: list[str] = Field(min_length=1, description="ids of indexed items to remove")


class ClassRequest(EmbedRequest):
    name: str = Field(min_length=1, max_length=200, description="class name; adding to a class refines it")


class SearchRequest(_Request):
    images: list[str] | None = Field(None, min_length=1, description="base64-encoded query images")
    vectors: list[list[FiniteFloat]] | None = Field(None, min_length=1, description="query embeddings")
    ids: list[str] | None = Field(None, min_length=1, description="ids of indexed items to search from")
    k: int | None = Field(None, description="hits per query (overrides the query parameter)")
    dim: int | None = Field(
        None, description="Matryoshka prefix: score on the first dim dimensions (overrides the query)"
    )
    filter: dict[str, Any] | None = Field(
        None,
        description='only items whose metadata match, e.g. {"label": 3} (in multipart: a `filter` '
        "field holding this JSON)",
    )

    @model_validator(mode="after")
    def _one_query_kind(self) -> "SearchRequest":
        given = [name for name in ("images", "vectors", "ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of images, vectors or ids")
        return self


# -- responses ------------------------------------------------------------------------


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    model: str = Field(description="fingerprint of the model artifact")


class Prediction(BaseModel):
    label: str
    score: float = Field(
        description="softmax probability (head), cosine similarity (prototype) or vote fraction (knn)"
    )


class ClassifyResponse(BaseModel):
    predictions: list[list[Prediction]]
    mode: ClassifyMode
    model: str = Field(description="fingerprint of the model that embedded (or classified) the images")


class Hit(BaseModel):
    id: str
    score: float = Field(description='similarity ("ip" metric, higher is better) or distance ("l2")')
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    results: list[list[Hit]]
    model: str | None = Field(None, description="fingerprint of the model that embedded image queries")


class ItemsResponse(BaseModel):
    added: int = Field(description="new ids")
    replaced: int = Field(description="ids that were already indexed (upsert)")
    removed: int = Field(0, description="ids removed")
    count: int = Field(description="items in the index afterwards")


class LiveClass(BaseModel):
    name: str
    examples: int = Field(description="example images averaged into the prototype")


class ClassesResponse(BaseModel):
    model: str = Field(description="fingerprint of the model the prototypes belong to")
    classes: list[LiveClass]


class HealthResponse(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Shared OpenAPI description of the two accepted image bodies (the route reads the raw
# request, so FastAPI cannot infer it).
def image_body_openapi(json_model: type[BaseModel]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image": {"type": "array", "items": {"type": "string", "format": "binary"}}
                        },
                        "required": ["image"],
                    }
                },
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }
