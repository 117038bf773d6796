"""The search page at GET /: plain HTML and JavaScript from serve/static, no build step.

The page only calls the app's own API (/v1/info, /v1/search, /v1/items/{id}/image) and loads
nothing from elsewhere. It is public, as /docs is: it holds no data, and asks for the API
token when the API answers 401.

    .venv/bin/python -m pytest -q tests/test_search_page.py
"""

from pathlib import Path

from fastapi.responses import Response

from serve.guard import api
from serve.parsing import ApiError

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
# Read once per process: the files are small, and a replica serves them without touching disk.
FILES = {p.name: (p.read_bytes(), MEDIA_TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in MEDIA_TYPES}
# The page is code: a new version of the app must reach browsers at once, so they revalidate.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def static_file(name: str) -> Response:
    if name not in FILES:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    body, media_type = FILES[name]
    return Response(body, media_type=media_type, headers=HEADERS)


@api.get("/", include_in_schema=False)
async def search_page() -> Response:
    return static_file("index.html")


@api.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    return static_file(name)
