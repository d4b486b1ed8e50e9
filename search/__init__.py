"""The online side: open a bundle, encode the query, search FAISS, rerank the top
candidates, and evaluate a model on a pairs file.

Names load on first use (``xmodal.crossmodal.lazy``).
"""

from xmodal.crossmodal.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "SearchEngine": "engine",
        "Result": "engine",
        "QueryError": "limits",
        "ModelMismatchError": "engine",
        "BundleError": "engine",
        "CatalogError": "engine",
        "ImageHit": "engine",
        "ImageFilter": "engine",
        "FilterError": "engine",
        "check_text": "engine",
        "TextQuery": "query",
        "encoder_for_bundle": "engine",
        "DEFAULT_RERANK_K": "limits",
        "MAX_RERANK_K": "limits",
        "MAX_K": "limits",
        "DEFAULT_K": "limits",
        "MAX_QUERY_CHARS": "limits",
        "load_scorer": "rerank",
        "good_match": "matching",
        "reranker_folder": "rerank",
        "bundle_status": "status",
        "model_advice": "status",
        "read_queries": "evaluate",
        "evaluate_queries": "evaluate",
        "score_queries": "evaluate",
        "evaluate_pairs": "evaluate",
        "format_table": "evaluate",
        "report_head": "evaluate",
    },
)
