"""Uploaded query images kept for a while under an opaque id, so that a search by image
has a URL: a reload or a shared link shows the same results until the id expires.

The store keeps each query as the small image the search runs on (``decode_upload``'s
output, reduced to ``QUERY_SIDE`` on its short side), losslessly encoded, so a search
from the store equals the search the upload asked for. It is bounded in count, bytes
and age; the least recently used query goes first. Ids are random (unguessable) and
say nothing about the image.
"""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image
from xmodal.crossmodal.errors import XmodalError
from xmodal.crossmodal.images import QUERY_SIDE

ID_BYTES = 16  # 128 random bits: an id cannot be guessed or enumerated
MAX_NAME_CHARS = 200  # of the uploaded file's name, kept only to be shown


class UploadExpired(XmodalError):
    """The id names no stored query: it expired, was evicted, or never existed."""


@dataclass(frozen=True)
class StoredQuery:
    """One uploaded query: its image (PNG bytes) and the file name it came with."""

    png: bytes
    filename: str
    stored_at: float

    @classmethod
    def of(cls, image: Image.Image, filename: str) -> StoredQuery:
        """The query kept for a decoded image: reduced (``query_image``), as PNG."""
        buf = io.BytesIO()
        query_image(image).save(buf, "PNG", compress_level=1)  # fast; lossless: results repeat
        return cls(buf.getvalue(), filename[:MAX_NAME_CHARS], time.monotonic())

    def image(self) -> Image.Image:
        """The query image, as the search saw it."""
        with Image.open(io.BytesIO(self.png)) as img:
            return img.convert("RGB")


def query_image(image: Image.Image, side: int = QUERY_SIDE) -> Image.Image:
    """The image a stored query keeps: at most ``side`` pixels on its short side."""
    scale = side / min(image.size)
    if scale >= 1:
        return image.convert("RGB")
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


class UploadStore:
    """A thread-safe LRU of uploaded queries, bounded by count, total bytes and age."""

    def __init__(self, max_count: int, max_bytes: int, ttl_s: float) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, StoredQuery] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many queries are stored now."""
        with self._lock:
            return len(self._data)

    @property
    def bytes(self) -> int:
        """The stored images' total size."""
        with self._lock:
            return self._bytes

    def put(self, image: Image.Image, filename: str) -> str:
        """Store a decoded upload; returns its new id."""
        item = StoredQuery.of(image, filename)
        key = secrets.token_urlsafe(ID_BYTES)
        with self._lock:
            self._data[key] = item
            self._bytes += len(item.png)
            self._evict()
        return key

    def get(self, key: str) -> StoredQuery:
        """The stored query, marked recently used; UploadExpired when it is gone."""
        with self._lock:
            self._evict()
            item = self._data.get(key)
            if item is None:
                raise UploadExpired(
                    "this image search has expired (uploads are kept for a while); "
                    "upload the image again"
                )
            self._data.move_to_end(key)
            return item

    def _evict(self) -> None:
        """Drop expired queries, then the least recently used beyond the bounds."""
        now = time.monotonic()
        for key in [k for k, v in self._data.items() if now - v.stored_at > self.ttl_s]:
            self._bytes -= len(self._data.pop(key).png)
        while self._data and (len(self._data) > self.max_count or self._bytes > self.max_bytes):
            _, item = self._data.popitem(last=False)
            self._bytes -= len(item.png)
