"""What a query may ask, defined once: the engine enforces these limits, and the web API,
its OpenAPI document, the CLI's options and the training configs take theirs from here.

Cheap to import (no torch, no FAISS): the CLI reads these for its options' ranges and
defaults before any command runs.
"""

from __future__ import annotations

from xmodal.crossmodal.errors import XmodalError

MAX_K = 1000  # results one search may return
DEFAULT_K = 10  # results when a caller names no k (the web app has its own DEFAULT_K setting)
MAX_RERANK_K = 200  # dual-encoder candidates the reranker may re-score
DEFAULT_RERANK_K = 32
MAX_QUERY_CHARS = 1000  # characters of a query text, as sent


class QueryError(XmodalError):
    """A query parameter is out of range or malformed."""


__all__ = [
    "DEFAULT_K",
    "DEFAULT_RERANK_K",
    "MAX_K",
    "MAX_QUERY_CHARS",
    "MAX_RERANK_K",
    "QueryError",
]
