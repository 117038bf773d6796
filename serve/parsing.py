"""Request parsing for the ingress: bodies within limits, images checked before any replica sees them.

Two body encodings for every image route: multipart parts named `image` (plus text fields
such as `id` or `name`, in order), or JSON with base64 strings. Every rejection is an
`ApiError` (status, code, message) that the app turns into `{"error": {"code", "message"}}`.

    .venv/bin/python -m pytest -q tests/test_serve.py -k bad_input
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from serve.schemas import AppArgs
from system.data.dataset import IMAGE_FORMATS, check_image


class ApiError(Exception):
    """A client error, turned into the JSON error shape by the app's exception handler."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def pydantic_message(errors) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)


@dataclass
class ParsedQuery:
    images: list[bytes] | None = None
    vectors: list[list[float]] | None = None
    ids: list[str] | None = None
    k: int | None = None
    dim: int | None = None
    mode: str | None = None
    name: str | None = None
    metadata: list[dict] | None = None
    filter: dict | None = None


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


async def parse_multipart(request: Request, body: bytes, max_images: int) -> ParsedQuery:
    async def replay():
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=max_images, max_fields=max_images + 16)
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
        texts = {
            key: [v for v in form.getlist(key) if isinstance(v, str)] for key in ("id", "name", "filter")
        }
    finally:
        await form.close()
    if not images:
        raise ApiError(422, "validation_error", "image: multipart body needs one or more parts named 'image'")
    return ParsedQuery(
        images=images,
        ids=texts["id"] or None,
        name=texts["name"][0] if texts["name"] else None,
        filter=parse_filter(texts["filter"][0]) if texts["filter"] else None,
    )


def parse_filter(text: str) -> dict | None:
    """A multipart `filter` field: a JSON object (empty text: no filter)."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, "invalid_filter", f"filter: not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_filter", 'filter: a JSON object, e.g. {"label": 3}')
    return value


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
        raise ApiError(422, "validation_error", pydantic_message(err.errors())) from None
    images = getattr(request, "images", None)
    names = ("vectors", "ids", "k", "dim", "mode", "name", "metadata", "filter")
    fields = {name: getattr(request, name, None) for name in names}
    return ParsedQuery(
        images=[decode_base64(text, i) for i, text in enumerate(images)] if images is not None else None,
        **fields,
    )


def image_header(data: bytes) -> tuple[tuple[int, int], str | None] | None:
    """((width, height), PIL's format name) from the image header alone, or None when it is
    no image PIL knows. Nothing is decoded."""
    # PIL cannot size a PNG whose chunks stop after IHDR, yet a bomb may be just that.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24]), "PNG"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # lazy: parses the header, decodes nothing
                return img.size, img.format
    except Image.DecompressionBombError:  # over PIL's own, far larger, limit
        return (1 << 31, 1), None
    except Exception:  # not an image at all: check_image gives the reason
        return None


def check_images(images: list[bytes], max_pixels: int) -> None:
    """Header checks only: a decompression bomb, a non-image or another format is refused before any decode.

    A payload with a valid header can still be truncated; that shows in the one full
    decode, in the embedder, which answers InvalidImage for it (a 400 as well).
    """
    headers = [image_header(data) for data in images]
    for i, header in enumerate(headers):
        if header is not None and header[0][0] * header[0][1] > max_pixels:
            (width, height), _ = header
            message = f"{width}x{height} is {width * height} pixels; at most {max_pixels}"
            raise ApiError(413, "too_many_pixels", f"image {i}: {message}")
    for i, (data, header) in enumerate(zip(images, headers, strict=True)):
        if header is None:  # no header PIL knows: check_image fails fast on it, with the reason
            raise ApiError(400, "invalid_image", f"image {i}: {check_image(data) or 'not a readable image'}")
        found = header[1]
        if found is not None and found not in IMAGE_FORMATS:  # fewer decoders facing the internet
            raise ApiError(415, "unsupported_image_format", f"image {i}: {found}; send JPEG, PNG or WebP")


async def read_query(request: Request, schema, args: AppArgs) -> ParsedQuery:
    """Body -> validated query: within limits, every image with a readable header of allowed size."""
    body = await read_body(request, args.max_body_bytes)
    if not body:
        raise ApiError(400, "empty_body", "empty body: send multipart parts named 'image' or a JSON object")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        query = await parse_multipart(request, body, args.max_images)
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
        # Off the event loop: header parsing is CPU work and the ingress serves other requests meanwhile.
        await asyncio.to_thread(check_images, query.images, args.max_image_pixels)
    return query


def resolve_k(body_k: int | None, query_k: int, max_k: int) -> int:
    k = query_k if body_k is None else body_k
    if not 1 <= k <= max_k:
        raise ApiError(422, "invalid_k", f"k: must be between 1 and {max_k}, got {k}")
    return k


def query_vectors(vectors: list[list[float]]) -> np.ndarray:
    """Rectangular and finite as float32; the dimension is the retriever's to check (it can change)."""
    lengths = {len(v) for v in vectors}
    if len(lengths) != 1:
        raise ApiError(422, "invalid_vector", f"vectors: all need the same length, got {sorted(lengths)}")
    array = np.asarray(vectors, dtype=np.float32)
    if not np.isfinite(array).all():  # finite doubles can still overflow float32
        raise ApiError(422, "invalid_vector", "vectors: values must be finite float32 numbers")
    return array
