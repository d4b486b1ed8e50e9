"""Search filters on catalog facts, pushed down into the FAISS search.

An ``ImageFilter`` (folder, file types, date taken, minimum width) selects catalog ids
with one SQL query (``Bundle.filter_ids``); ``search_within`` then restricts the FAISS
search to them with an ``IDSelectorBitmap``, so a filtered search returns k results
whenever k indexed images pass, instead of post-filtering a top k into fewer:

* exact indexes (``IDMap2,Flat``) scan only the ids that pass;
* IVF indexes probe more lists the fewer ids pass (enough lists to hold about k of
  them), then more until k are found or every list has been probed;
* index types that take no selector are over-fetched and refilled (k doubled until k
  pass or the whole index was ranked).

Dates are "taken" dates: EXIF DateTimeOriginal (else DateTime) read as UTC wall-clock
time, else the file's mtime (``ImageRow.taken_ns``). ``taken_after`` is inclusive,
``taken_before`` exclusive; a bare date means its midnight (UTC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import faiss
import numpy as np
from xmodal.crossmodal.errors import XmodalError

# Image types people name, and the catalog's format for each (Pillow's names).
TYPE_NAMES: dict[str, str] = {
    "jpeg": "JPEG",
    "jpg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
    "tif": "TIFF",
    "heif": "HEIF",
    "heic": "HEIF",
    "avif": "AVIF",
}
MAX_WIDTH = 1_000_000  # larger than any image Pillow would decode (bomb guard)
NS = 1_000_000_000


class FilterError(XmodalError):
    """A filter value that cannot be used; the message names the filter and the value,
    ``param`` the filter (as the API spells it) and ``problem`` what is wrong with it, in
    words a page can show next to its field."""

    def __init__(self, message: str, param: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.param = param
        self.problem = problem or message


def parse_when(value: str | date | datetime, name: str) -> datetime:
    """An ISO date (2019-07-14) or date-time (2019-07-14T10:30, UTC unless it says
    otherwise) as an aware datetime."""
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, date):
        when = datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip()
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            problem = "must be a date like 2019-07-14 (or 2019-07-14T10:30)"
            raise FilterError(f"{name} {problem}, not {text[:40]!r}", name, problem) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _folder(value: str) -> str:
    """A folder relative to an indexed root, as the catalog spells paths (``a/b``)."""
    parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        problem = "must lie inside an indexed folder"
        raise FilterError(f"folder {problem}, not {value[:80]!r}", "folder", problem)
    return "/".join(parts)


@dataclass(frozen=True)
class ImageFilter:
    """Which indexed images a search may return; None / empty means no restriction.

    ``folder`` is a subfolder relative to an indexed root (or an absolute path inside
    one), matched with a separator boundary ("trips" holds "trips/x.jpg", not
    "trips2/x.jpg"); ``types`` are image formats ("jpeg", "png", ...).
    """

    folder: str | None = None
    types: tuple[str, ...] = ()
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    min_width: int | None = None

    def __post_init__(self) -> None:
        folder = self.folder
        if folder is not None and not folder.startswith("/"):
            folder = _folder(folder) or None
        object.__setattr__(self, "folder", folder)
        object.__setattr__(self, "types", tuple(sorted({self._type(t) for t in self.types})))
        for name in ("taken_after", "taken_before"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_when(value, name))
        if self.taken_after and self.taken_before and self.taken_after >= self.taken_before:
            raise FilterError(
                f"taken_after ({self.taken_after.date()}) must be earlier than "
                f"taken_before ({self.taken_before.date()})",
                "taken_before",
                "must be later than the start date",
            )
        w = self.min_width
        problem = f"must be a whole number of pixels from 1 to {MAX_WIDTH:,}"
        if w is not None and (isinstance(w, bool) or not isinstance(w, int)):
            raise FilterError(f"min_width {problem}, not {w!r}", "min_width", problem)
        if w is not None and not 1 <= w <= MAX_WIDTH:
            raise FilterError(f"min_width {problem}, not {w}", "min_width", problem)

    @staticmethod
    def known_types() -> list[str]:
        """The type names a filter takes (aliases such as "jpg" and "tif" besides)."""
        return sorted({v.lower() for v in TYPE_NAMES.values()})

    @staticmethod
    def _type(name: str) -> str:
        key = str(name).strip().lower().lstrip(".")
        if key.upper() in TYPE_NAMES.values():
            return key.upper()
        if key not in TYPE_NAMES:
            known = ", ".join(ImageFilter.known_types())
            raise FilterError(
                f"unknown image type {str(name)[:20]!r} (known: {known})",
                "type",
                f"must be one of {known}",
            )
        return TYPE_NAMES[key]

    @classmethod
    def parse(
        cls,
        folder: str | None = None,
        type: str | None = None,  # the API parameter's name
        taken_after: str | None = None,
        taken_before: str | None = None,
        min_width: str | int | None = None,
    ) -> ImageFilter:
        """A filter from request or command-line strings (empty means not given);
        ``type`` may list several, comma-separated ("jpeg,png")."""
        width: int | None = None
        if min_width not in (None, ""):
            try:
                width = int(str(min_width).strip())
            except ValueError:
                problem = f"must be a whole number of pixels from 1 to {MAX_WIDTH:,}"
                raise FilterError(
                    f"min_width {problem}, not {str(min_width)[:20]!r}", "min_width", problem
                ) from None
        types = tuple(t for t in (type or "").split(",") if t.strip())
        return cls(
            folder=folder or None,
            types=types,
            taken_after=taken_after or None,  # type: ignore[arg-type]
            taken_before=taken_before or None,  # type: ignore[arg-type]
            min_width=width,
        )

    @property
    def active(self) -> bool:
        """Whether it restricts anything."""
        return any((self.folder, self.types, self.taken_after, self.taken_before, self.min_width))

    def to_dict(self) -> dict[str, Any]:
        """The filters in force, as the API echoes them (absent ones left out)."""
        out: dict[str, Any] = {}
        if self.folder:
            out["folder"] = self.folder
        if self.types:
            out["type"] = [t.lower() for t in self.types]
        for name in ("taken_after", "taken_before"):
            if getattr(self, name):
                out[name] = getattr(self, name).isoformat()
        if self.min_width:
            out["min_width"] = self.min_width
        return out

    def taken_range_ns(self) -> tuple[int | None, int | None]:
        """(after, before) as ns since the epoch, as ``taken_ns`` stores dates."""

        def ns(when: datetime | None) -> int | None:
            return None if when is None else int(when.timestamp()) * NS

        return ns(self.taken_after), ns(self.taken_before)


def id_selector(allowed: np.ndarray) -> faiss.IDSelector:
    """A FAISS selector of these ids: a bitmap over 0..max id (one bit an id, built by
    numpy in well under a millisecond for 100k ids, where an ``IDSelectorBatch`` hashes
    each id: about 8 ms for 50k)."""
    mask = np.zeros(int(allowed.max()) + 1, dtype=bool)
    mask[allowed] = True
    bits = np.packbits(mask, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    sel.bits = bits  # FAISS keeps a pointer: the array must live as long as the selector
    return sel


def _valid(ids: np.ndarray) -> np.ndarray:
    return (ids >= 0).sum(axis=1)


def search_within(
    index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search of ``queries`` [Q, D] restricted to the ids in ``allowed``: (scores,
    ids) [Q, k'] with k' = min(k, len(allowed)), -1 where fewer of them are indexed."""
    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    want = min(k, len(allowed))
    if want == 0 or index.ntotal == 0:
        return np.full((len(q), 0), -np.inf, np.float32), np.full((len(q), 0), -1, np.int64)
    sel = id_selector(allowed)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        # Enough lists to hold about 2k passing vectors if they spread evenly.
        share = len(allowed) / max(index.ntotal, 1)
        nprobe = max(ivf.nprobe, math.ceil(2 * want * ivf.nlist / max(share * index.ntotal, 1)))
        while True:
            nprobe = min(nprobe, ivf.nlist)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
            scores, ids = index.search(q, want, params=params)
            if _valid(ids).min() >= want or nprobe >= ivf.nlist:
                return scores, ids
            nprobe *= 4
    try:
        scores, ids = index.search(q, want, params=faiss.SearchParameters(sel=sel))
        # An exact index found every allowed id it holds; a graph (HNSW) may miss some.
        if _valid(ids).min() >= want or _exact(index):
            return scores, ids
    except RuntimeError:  # this index type takes no selector
        pass
    return _refill(index, q, want, allowed)


def _exact(index: faiss.Index) -> bool:
    """Whether a search ranks every vector (a flat index, bare or under an id map)."""
    base = index.index if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2) else index
    return isinstance(faiss.downcast_index(base), faiss.IndexFlat)


def _refill(
    index: faiss.Index, q: np.ndarray, want: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Over-fetch and refill: rank deeper until ``want`` allowed ids are found."""
    fetch = want * 4
    while True:
        fetch = min(fetch, index.ntotal)
        scores, ids = index.search(q, fetch)
        keep = np.isin(ids, allowed) & (ids >= 0)
        if keep.sum(axis=1).min() >= want:
            break
        if fetch >= index.ntotal:  # a graph index stops short: score the allowed exactly
            return _exact_over(index, q, want, allowed)
        fetch *= 4
    out_s = np.full((len(q), want), -np.inf, np.float32)
    out_i = np.full((len(q), want), -1, np.int64)
    for r in range(len(q)):
        s, i = scores[r][keep[r]][:want], ids[r][keep[r]][:want]
        out_s[r, : len(s)], out_i[r, : len(i)] = s, i
    return out_s, out_i


def _exact_over(
    index: faiss.Index, q: np.ndarray, want: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products against the allowed ids' vectors, read back from the index
    (an ``IDMap2``); ids it does not hold are skipped."""
    held = [int(i) for i in allowed if _holds(index, int(i))]
    if not held:
        return np.full((len(q), want), -np.inf, np.float32), np.full((len(q), want), -1, np.int64)
    vectors = np.vstack([index.reconstruct(i) for i in held])
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(vectors, np.asarray(held, np.int64))
    scores, ids = flat.search(q, want)
    return scores, ids


def _holds(index: faiss.Index, i: int) -> bool:
    try:
        index.reconstruct(i)
    except RuntimeError:
        return False
    return True
