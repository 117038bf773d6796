"""Bearer-token auth for the ingress.

The token comes from `--token-file` (AppArgs.token_file) or the environment variable
REPFORGE_API_TOKEN of the process that builds the app. Only its SHA-256 crosses into Ray
(deployment init args are stored by the Serve controller), and requests are compared in
constant time. /v1/health, the OpenAPI pages and the search page (no data) stay open.

    REPFORGE_API_TOKEN=secret repforge serve --model ... ;  curl -H 'Authorization: Bearer secret' ...
"""

from __future__ import annotations

import hashlib
import hmac
import os

from system import storage

TOKEN_ENV = "REPFORGE_API_TOKEN"
OPEN_PATHS = frozenset({"/", "/v1/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PREFIX = "/static/"  # the search page's files: code, no data


class TokenError(ValueError):
    """The token file is missing or empty: one line."""


def token_sha256(token_file: str | None) -> str | None:
    """Digest of the configured token, or None when no token is configured (auth off)."""
    if token_file:
        try:
            token = storage.read_text(storage.normalize(token_file)).strip()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"token_file: cannot read {token_file}: {err}") from None
        if not token:
            raise TokenError(f"token_file: {token_file} is empty")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def authorized(path: str, authorization: str | None, expected_sha256: str | None) -> bool:
    if expected_sha256 is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    got = hashlib.sha256(token.strip().encode()).hexdigest()
    return hmac.compare_digest(got, expected_sha256)


# Set by the ingress replica's constructor; read by the HTTP middleware of the same process.
RUNTIME = {"token_sha256": None, "timeout_s": 30.0}


def configure(token_sha256_: str | None, timeout_s: float) -> None:
    RUNTIME.update(token_sha256=token_sha256_, timeout_s=timeout_s)
