"""Typed shapes of the serve application: its build arguments and the /v1 HTTP API.

`AppArgs` is what `serve.app:build_app` accepts (from `deploy.yaml`, `repforge serve`
or `start_app`); the request and response models document the API at /docs and
validate JSON bodies. Every error leaves the app as `ErrorResponse`.
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# JSON allows no NaN/inf, but Python clients send them anyway: refuse them at the edge.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class AppArgs(BaseModel):
    """Arguments of `build_app`; every field doubles as `repforge serve --help` text."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model artifact URI used for /v1/embed and image queries of /v1/search")
    index: str | None = Field(None, description="index folder URI for /v1/search (omit to serve no index)")
    classifier: str | None = Field(
        None,
        description="model artifact with a classification head for /v1/classify "
        "(default: the model itself when it has a head)",
    )
    max_batch_size: int = Field(32, ge=1, description="most images in one batched forward pass")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="how long a batch waits for more images before it runs"
    )
    max_k: int = Field(100, ge=1, description="largest k a client may ask for")
    max_images: int = Field(64, ge=1, description="most images (or query vectors / ids) in one request")
    max_body_bytes: int = Field(20_000_000, ge=1, description="largest request body accepted, in bytes")


# -- requests -------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Request):
    images: list[str] = Field(min_length=1, description="base64-encoded JPEG/PNG/WebP images")


class ClassifyRequest(EmbedRequest):
    k: int | None = Field(None, description="labels per image (overrides the query parameter)")


class SearchRequest(_Request):
    images: list[str] | None = Field(None, min_length=1, description="base64-encoded query images")
    vectors: list[list[FiniteFloat]] | None = Field(None, min_length=1, description="query embeddings")
    ids: list[str] | None = Field(None, min_length=1, description="ids of indexed items to search from")
    k: int | None = Field(None, description="hits per query (overrides the query parameter)")

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
    score: float = Field(description="softmax probability")


class ClassifyResponse(BaseModel):
    predictions: list[list[Prediction]]


class Hit(BaseModel):
    id: str
    score: float = Field(description='similarity ("ip" metric, higher is better) or distance ("l2")')
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    results: list[list[Hit]]


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
