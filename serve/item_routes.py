"""The /v1/items routes of the ingress: live items in, out, and their stored images.

A mixin of serve.ingress.RepforgeIngress (Serve finds routes on its bases too), kept apart
so each file stays readable.

    .venv/bin/python -m pytest -q tests/test_serve_live.py -k items
    .venv/bin/python -m pytest -q tests/test_serve.py -k item_image
"""

# No `from __future__ import annotations` (see serve.ingress).

import asyncio

from fastapi import Path, Query, Request
from fastapi.responses import Response

from serve.errors import UnknownItem
from serve.guard import ERRORS, api, call, cause
from serve.images import CACHE_CONTROL, THUMB_SIZES, item_image
from serve.parsing import ApiError, read_query
from serve.schemas import DeleteItemsRequest, ItemsRequest, ItemsResponse, image_body_openapi
from serve.search import SOURCE_COLUMNS
from system.index import IndexInputError
from system.index.recipes import shard_of


class ItemRoutes:
    """Routes over the live index; needs the ingress's retrievers, local copy, args and helpers."""

    @api.post(
        "/v1/items",
        response_model=ItemsResponse,
        responses=ERRORS,
        openapi_extra=image_body_openapi(ItemsRequest),
    )
    async def add_items(self, request: Request) -> dict:
        """Add images to the live index under the given ids (an existing id is replaced); persisted,
        with the images (GET /v1/items/{id}/image)."""
        self.need_index()
        query = await read_query(request, ItemsRequest, self.args)
        ids = query.ids or []
        if len(ids) != len(query.images) or len(set(ids)) != len(ids):
            raise ApiError(422, "validation_error", "ids: one unique id per image ('id' fields in multipart)")
        for meta in query.metadata or []:
            if set(meta) & set(SOURCE_COLUMNS):
                raise ApiError(422, "invalid_item", f"metadata: {', '.join(SOURCE_COLUMNS)} are the server's")
        deadline = self.deadline()
        out = await self.embed_images(query.images, deadline)
        owners = await self.owners(ids, deadline)
        # A new id goes to a shard chosen by a stable hash of it; an existing one stays where it is.
        hashed = shard_of(ids, len(self.retrievers))  # the build's rule (system.index.recipes)
        shards = [owners.get(i, int(h)) for i, h in zip(ids, hashed)]
        done = []
        try:
            for shard in sorted(set(shards)):
                picks = [n for n, s in enumerate(shards) if s == shard]
                meta = [query.metadata[n] for n in picks] if query.metadata else None
                args = ([ids[n] for n in picks], out["vectors"][picks], meta, out["model"])
                images = [query.images[n] for n in picks]
                done.append(await call(self.retrievers[shard].upsert, *args, images, deadline=deadline))
        except IndexInputError as err:
            raise ApiError(422, "invalid_item", cause(err)) from None
        await self.synced()
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
            raise ApiError(422, "invalid_item", cause(err)) from None
        await self.synced()
        return {"added": 0, "replaced": 0, "removed": removed, "count": await self.count(deadline)}

    async def synced(self) -> None:
        """This replica's index copy (if any) holds the change it just made: it reads its writes."""
        if self.local is not None:
            self.local.start()
            try:
                await self.local.sync()
            except Exception:  # noqa: BLE001  the poller catches up; the change is saved either way
                pass

    async def count(self, deadline: float) -> int:
        return sum(i["count"] for i in await self.index_infos())

    @api.get(
        "/v1/items/{item_id:path}/image",
        responses={**ERRORS, 200: {"content": {"image/png": {}, "image/jpeg": {}}}},
        response_class=Response,
    )
    async def item_image(
        self,
        request: Request,
        item_id: str = Path(description="an indexed item's id (may contain slashes)"),
        size: int | None = Query(
            None, description=f"longest side in pixels, {THUMB_SIZES[0]}-{THUMB_SIZES[1]}"
        ),
    ) -> Response:
        """The stored image of an indexed item (from the dataset row it was embedded from), resized."""
        self.need_index()
        if size is not None and not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
            raise ApiError(
                422, "invalid_size", f"size: between {THUMB_SIZES[0]} and {THUMB_SIZES[1]}, got {size}"
            )
        deadline = self.deadline()
        owners = await self.owners([item_id], deadline)
        if item_id not in owners:
            raise ApiError(404, "unknown_id", f"unknown id: {item_id}")
        try:
            source = await call(self.retrievers[owners[item_id]].image_source, item_id, deadline=deadline)
            body, media_type, etag = await asyncio.to_thread(item_image, source, size)
        except UnknownItem as err:
            raise ApiError(404, "no_image", cause(err)) from None
        headers = {"Cache-Control": CACHE_CONTROL, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)
