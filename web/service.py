"""The per-process search service the web app shares between its threads.

The bundle and the model are loaded once per process. Repeated text queries hit an
LRU cache of text embeddings; thumbnails are made once and kept on disk; image files
are served only by catalog id, and only when their real path (symlinks resolved)
lies inside an indexed root.

A re-index while serving publishes a new generation, which the service picks up; a
manifest that cannot be loaded leaves the last good generation in service and is
logged once (and shown by ``/api/health``) until the manifest changes again.
Uploads are decoded small (``decode_upload``) and at most ``UPLOAD_DECODE_SLOTS`` at a
time, so a few clients sending large pictures cannot take the server's memory.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image
from xmodal.crossmodal.errors import XmodalError
from xmodal.crossmodal.images import QUERY_SIDE, ImageDecodeError, decode_image, decode_upload
from xmodal.search.engine import (
    DEFAULT_RERANK_K,
    ImageFilter,
    ImageHit,
    Result,
    SearchEngine,
    check_text,
)
from xmodal.search.query import TextQuery
from xmodal.search.status import bundle_status

from . import DEFAULTS, MAX_CATALOG_ID, REFRESH_EVERY_S, UPLOAD_DECODE_SLOTS
from .uploads import StoredQuery, UploadStore

THUMBNAIL_SIZE = 256

log = logging.getLogger(__name__)


class NotServable(XmodalError):
    """The id is unknown, or its file may not or cannot be served."""


class EmbeddingCache:
    """A thread-safe LRU of query text -> its encoding (embedding, and tokens to rerank)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, TextQuery] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """How many query encodings are cached."""
        with self._lock:
            return len(self._data)

    def get(self, key: str) -> TextQuery | None:
        """The cached encoding, marked recently used; None on a miss."""
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: TextQuery) -> None:
        """Store a query encoding, evicting the least recently used."""
        # Shared by every request that asks the same text: none may change it.
        value.vector.setflags(write=False)
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


class SearchService:
    """Everything a request needs: engine, caches, safe file access."""

    def __init__(
        self,
        engine: SearchEngine,
        thumbnail_dir: Path | None = None,
        cache_size: int = 2048,
        decode_slots: int = UPLOAD_DECODE_SLOTS,
        refresh_every_s: float = REFRESH_EVERY_S,
        uploads: UploadStore | None = None,
    ) -> None:
        self.engine = engine
        self.uploads = uploads or UploadStore(
            DEFAULTS["UPLOAD_STORE_COUNT"],
            DEFAULTS["UPLOAD_STORE_BYTES"],
            DEFAULTS["UPLOAD_STORE_TTL_S"],
        )
        self.text_cache = EmbeddingCache(cache_size)
        self.thumbnail_dir = Path(thumbnail_dir or engine.bundle.path / "thumbnails")
        self._roots = [os.path.realpath(r) for r in engine.bundle.roots()]
        self._checked = time.monotonic()
        self._refresh_lock = threading.Lock()
        self.refresh_every_s = refresh_every_s
        # The manifest file as last checked (inode, size, mtime): unchanged means nothing new.
        self._manifest_seen = engine.published_stamp()
        self.refresh_problem: str | None = None  # why the newest manifest is not served
        self._decode_slots = threading.BoundedSemaphore(decode_slots)

    @property
    def bundle(self):  # type: ignore[no-untyped-def]
        """The bundle generation being served."""
        return self.engine.bundle

    def maybe_refresh(self, every_s: float | None = None) -> None:
        """At most every few seconds, pick up a generation published since start-up.

        Never raises: a manifest that cannot be loaded keeps the last good generation in
        service; the problem is logged once and kept in ``refresh_problem`` until the
        manifest file changes (publishing writes a new file, so the next run is seen).
        """
        every = self.refresh_every_s if every_s is None else every_s
        now = time.monotonic()
        if now - self._checked < every or not self._refresh_lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            stamp = self.engine.published_stamp()
            if stamp == self._manifest_seen:
                return
            self._manifest_seen = stamp
            problem = self._refresh()
            if problem and problem != self.refresh_problem:
                log.warning("%s", problem)
            self.refresh_problem = problem
        finally:
            self._refresh_lock.release()

    def _refresh(self) -> str | None:
        """Switch to the published generation; a one-line problem when it cannot be served."""
        served = self.engine.bundle.manifest.generation
        keeping = f"keeping generation {served} of {self.engine.bundle.path} in service"
        # Any failure at all is caught: requests must go on being answered from the
        # generation already open, which stays intact (a reload opens a new Bundle beside it).
        try:
            if self.engine.refresh():
                self._roots = [os.path.realpath(r) for r in self.engine.bundle.roots()]
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"cannot serve the new bundle generation ({first}); {keeping}"
        return None

    # ------------------------------------------------------------------ search

    @property
    def can_rerank(self) -> bool:
        """Whether the loaded model has a reranker."""
        return self.engine.reranker is not None

    def text_query(self, q: str) -> TextQuery:
        """Encoding of a query text, from the cache when seen before."""
        key = check_text(q)
        query = self.text_cache.get(key)
        if query is None:
            query = self.engine.text_query(key)
            self.text_cache.put(key, query)
        return query

    def text_to_images(
        self,
        q: str,
        k: int,
        min_score: float | None,
        rerank: bool | None = None,
        rerank_k: int = DEFAULT_RERANK_K,
        offset: int = 0,
        filters: ImageFilter | None = None,
    ) -> list[Result]:
        """Images for a text query (reranked by default when the model can), from the
        ``offset``-th result, among those ``filters`` let through."""
        query = self.text_query(q)
        return self.engine.text_to_images(
            q, k, min_score, rerank, rerank_k, query=query, offset=offset, filters=filters
        )

    def decode_upload(self, data: bytes) -> Image.Image:
        """Decode uploaded bytes small and safely; at most ``decode_slots`` at a time."""
        with self._decode_slots:
            return decode_upload(data)

    def image_query(
        self,
        data: bytes | Image.Image,
        target: str,
        k: int,
        min_score: float | None = None,
        rerank: bool | None = None,
        rerank_k: int = DEFAULT_RERANK_K,
        offset: int = 0,
        filters: ImageFilter | None = None,
    ) -> list[Result]:
        """Images or captions for an upload: its bytes, or what ``decode_upload`` made;
        ``filters`` restrict images (captions take none)."""
        image = self.decode_upload(data) if isinstance(data, bytes) else data
        if target == "captions":
            return self.engine.image_to_captions(
                image, k, min_score, rerank, rerank_k, offset=offset
            )
        return self.engine.image_to_images(image, k, min_score, offset=offset, filters=filters)

    def indexed_query(self, image_id: int) -> StoredQuery:
        """An indexed image as a search-by-image query ("search with this image")."""
        path, hit = self.safe_path(image_id)
        try:
            with self._decode_slots:
                image = decode_image(path, draft=(QUERY_SIDE, QUERY_SIDE))
        except (OSError, ImageDecodeError) as exc:
            raise NotServable(f"image {image_id} cannot be decoded: {exc}") from exc
        return StoredQuery.of(image, hit.relpath.rsplit("/", 1)[-1])

    def similar(self, image_id: int, k: int, offset: int = 0) -> list[Result]:
        """'More like this' for an indexed image."""
        return self.engine.similar_images(image_id, k, offset=offset)

    # ------------------------------------------------------------------ catalog

    def image(self, image_id: int) -> ImageHit:
        """Catalog facts of an indexed image, or NotServable."""
        if not 0 < image_id <= MAX_CATALOG_ID:  # SQLite would raise OverflowError
            raise NotServable(f"no indexed image with id {image_id}")
        hit = self.bundle.images([image_id]).get(image_id)
        if hit is None:
            raise NotServable(f"no indexed image with id {image_id}")
        return hit

    def image_details(self, image_id: int) -> dict[str, Any]:
        """The image's path, metadata and linked captions."""
        hit = self.image(image_id)
        return {
            "id": hit.id,
            "path": hit.path,
            "relpath": hit.relpath,  # what pages show: the server's folders stay private
            "width": hit.width,
            "height": hit.height,
            "bytes": hit.size,
            "format": hit.format,
            "sha256": hit.content_hash,
            "captions": [
                {"id": c.id, "caption": c.text, "source": c.source}
                for c in self.bundle.captions_of_image(image_id)
            ],
        }

    def safe_path(self, image_id: int) -> tuple[str, ImageHit]:
        """The real path of an image, only if it lies inside an indexed root."""
        hit = self.image(image_id)
        real = os.path.realpath(hit.fs_path)
        inside = any(real == r or real.startswith(r.rstrip(b"/") + b"/") for r in self._roots)
        if not inside:
            raise NotServable(f"image {image_id} resolves outside the indexed folders")
        if not os.path.isfile(real):
            raise NotServable(f"image {image_id} is no longer on disk")
        return os.fsdecode(real), hit

    def thumbnail(self, image_id: int) -> Path:
        """A WebP thumbnail, made once and cached on disk by content hash."""
        path, hit = self.safe_path(image_id)
        digest = hit.content_hash or hashlib.sha256(os.fsencode(path)).hexdigest()
        target = self.thumbnail_dir / digest[:2] / f"{digest}-{THUMBNAIL_SIZE}.webp"
        if target.is_file():
            return target
        try:
            img = decode_image(path, draft=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        except (OSError, ImageDecodeError) as exc:
            raise NotServable(f"image {image_id} cannot be decoded: {exc}") from exc
        img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "WEBP", quality=82)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Two threads may make the same thumbnail: each writes its own file, the
        # rename is atomic, readers never see half a file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, target)
        return target

    def status(self) -> dict[str, Any]:
        """Model, counts, indexes, last run, failures."""
        status = bundle_status(self.bundle, failures_limit=100)
        status["text_cache"] = {
            "size": len(self.text_cache),
            "hits": self.text_cache.hits,
            "misses": self.text_cache.misses,
        }
        return status


def current_service() -> SearchService:
    """The SearchService of the app handling the current request."""
    from flask import current_app

    return current_app.extensions["xmodal"]
