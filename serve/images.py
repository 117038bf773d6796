"""Item images for GET /v1/items/{id}/image: read from where the index says the row came from.

The embeddings (and so the index's id map) carry `source_uri` (the Parquet file the row was
read from, or a stored image file for a live item: `source_row` -1) and `source_row` (its
position in that file), so the app keeps no second copy of the dataset's images. A row is
read with its row group's `image` column; the last few row groups and thumbnails are kept
in memory, since a results page asks for a dozen neighbours that are often close by.

    .venv/bin/python -m pytest -q tests/test_serve.py -k item_image
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

from serve.errors import UnknownItem

THUMB_SIZES = (4, 2048)  # smallest and largest ?size= accepted
CACHE_CONTROL = "private, max-age=3600"  # an item's image changes only if the item is replaced


class LRU:
    """A small thread-safe least-recently-used map."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


ROW_GROUPS = LRU(4)
THUMBNAILS = LRU(512)


def read_source(uri: str, row: int) -> bytes:
    """The encoded image at `row` of Parquet file `uri` (row -1: the file is the image itself)."""
    from system import storage

    fs, path = storage.filesystem(uri)
    try:
        if row < 0:
            with fs.open_input_stream(path) as f:
                return f.read()
        return _parquet_row(fs, path, uri, row)
    except (OSError, ValueError) as err:
        raise UnknownItem(f"the stored image is not readable: {err}") from None


def _parquet_row(fs, path: str, uri: str, row: int) -> bytes:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        reader = pq.ParquetFile(f)
        first = 0
        for group in range(reader.metadata.num_row_groups):
            rows = reader.metadata.row_group(group).num_rows
            if row < first + rows:
                column = ROW_GROUPS.get((uri, group))
                if column is None:
                    column = reader.read_row_group(group, columns=["image"]).column("image").combine_chunks()
                    ROW_GROUPS.put((uri, group), column)
                return column[row - first].as_py()
            first += rows
    raise UnknownItem(f"row {row} is past the end of {uri}")


def thumbnail(data: bytes, size: int | None) -> tuple[bytes, str]:
    """(encoded image, media type): the original when it fits `size`, else resized to fit it.

    PNG stays PNG (digits, icons: lossless and small); everything else becomes JPEG.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        if size is None or max(img.size) <= size:
            if fmt in ("PNG", "JPEG", "WEBP"):
                return data, f"image/{fmt.lower()}"
        if size:
            img.draft("RGB", (size, size))  # JPEG only: decode at a reduced scale
        img = img.convert("RGBA" if fmt == "PNG" else "RGB")
        if size:
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if fmt == "PNG":
            img.save(out, format="PNG", optimize=True)
            return out.getvalue(), "image/png"
        img.save(out, format="JPEG", quality=85)
        return out.getvalue(), "image/jpeg"


def item_image(source: dict, size: int | None) -> tuple[bytes, str, str]:
    """(bytes, media type, ETag) of an item's image at `size`, from its image_source."""
    if source.get("data") is not None:
        data = source["data"]
    elif source.get("uri"):
        cached = THUMBNAILS.get((source["uri"], source["row"], size))
        if cached is not None:
            return cached
        data = read_source(source["uri"], source["row"])
    else:
        raise UnknownItem("the image of this item is not stored")
    body, media = thumbnail(data, size)
    etag = '"' + hashlib.sha256(body).hexdigest()[:24] + '"'
    out = (body, media, etag)
    if source.get("uri") and source["row"] >= 0:  # a live item's file may be replaced: not kept
        THUMBNAILS.put((source["uri"], source["row"], size), out)
    return out
