"""The FastAPI app object of the ingress and what guards every route: bearer-token auth, the
request timeout, Prometheus metrics, the JSON error shape, and handle calls that retry a dead
replica and turn backpressure into 503.

Every error leaves as `{"error": {"code", "message"}}`: 4xx for bad input, 503 when a
deployment's queue is full (backpressure) or no replica answers, 504 past the request timeout.

    .venv/bin/python -m pytest -q tests/test_serve.py -k "middleware or bad_input"
"""

# No `from __future__ import annotations`: FastAPI resolves the handlers' annotations.

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException

from serve import auth, metrics
from serve.errors import InvalidImage, VersionMismatch
from serve.parsing import ApiError, pydantic_message
from serve.schemas import ErrorResponse

RETRIES = 3  # a replica that died mid-request: the call is retried on another (every call is idempotent)
ROUTES = {"/v1/embed", "/v1/classify", "/v1/search", "/v1/items", "/v1/classes", "/v1/info", "/v1/health"}
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 415, 422, 503, 504)}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    metrics.observe_error(code)
    # 503: shed at once (a full queue) or no replica yet; a client retries after a pause.
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


api = FastAPI(
    title="repforge",
    version="1",
    description="Embed, classify and search images with a repforge model artifact and FAISS index. "
    "Send `Authorization: Bearer TOKEN` when the app has a token. A search page is at `/`.",
)


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/v1/items/") and path.endswith("/image"):
        return "/v1/items/{id}/image"
    return "other"


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
        route = route_label(request.url.path)
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
            response = error_response(
                401, "unauthorized", "send the API token as 'Authorization: Bearer TOKEN'"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, counting_send)
            return
        try:
            await _within(self.app(scope, receive, counting_send), auth.RUNTIME["timeout_s"])
        except asyncio.TimeoutError:
            if status is not None:  # too late for a 504: the response has begun
                count(status)
                raise
            response = error_response(504, "timeout", f"no answer within {auth.RUNTIME['timeout_s']} s")
            await response(scope, receive, counting_send)
        except Exception:  # a bug: counted here, answered by the 500 handler
            count(500)
            raise
        count(status or 500)  # a response that never finished its body (the client left)


async def _within(coroutine, seconds: float) -> None:
    """Await `coroutine`, raising asyncio.TimeoutError after `seconds`.

    asyncio.timeout (3.11+) runs it in the request's own task; wait_for before 3.12 wraps it
    in a new task per request, one more event-loop turn on every answer.
    """
    if not hasattr(asyncio, "timeout"):  # Python 3.10
        return await asyncio.wait_for(coroutine, seconds)
    async with asyncio.timeout(seconds):
        await coroutine


api.add_middleware(Guard)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(err.status, err.code, err.message)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    # Routing errors (unknown path, wrong method) get the same shape as ours.
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(err.status_code, codes.get(err.status_code, "http_error"), str(err.detail))


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    # A bug, not bad input; still the same shape (Starlette logs the traceback).
    return error_response(500, "internal_error", f"internal error ({type(err).__name__}); see the server log")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(422, "validation_error", pydantic_message(err.errors()))


def cause(err: Exception) -> str:
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
            raise ApiError(400, "invalid_image", cause(err)) from None
        except VersionMismatch as err:
            # A swap is half applied (the model moved, the index not yet): it settles in seconds.
            if time.monotonic() > deadline:
                raise ApiError(409, "version_mismatch", cause(err)) from None
            await asyncio.sleep(0.1)
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as err:
            # Retried until the deadline: Serve replaces a dead replica within seconds.
            failures += 1
            if failures > RETRIES and time.monotonic() > deadline:
                raise ApiError(503, "unavailable", f"no replica answered: {cause(err)}") from None
            await asyncio.sleep(min(0.05 * 2**failures, 1.0))
