"""The offline indexer: folders and caption files into an index bundle (FAISS indexes,
a SQL catalog, a manifest), incremental, resumable, one writer at a time; and the
bundle format itself (``bundle``), the one module the search side reads bundles through.

Names load on first use (``xmodal.crossmodal.lazy``).
"""

from xmodal.crossmodal.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        # running the indexer
        "IndexOptions": "options",
        "ENGINES": "options",
        "RAY_LOCAL": "options",
        "import_ray": "ray_cluster",
        "check_address": "ray_cluster",
        "RayEngineError": "ray_cluster",
        "RunReport": "pipeline",
        "IndexRunError": "pipeline",
        "run_index": "pipeline",
        "writer_pid": "lock",
        "check_caption_file": "captions",
        "read_regular_file": "captions",
        "MAX_FILE_BYTES": "decode",
        "verify_bundle": "verify",
        "VerifyReport": "verify",
        "parse_memory": "compressed",
        "MemoryBudgetError": "compressed",
        # the bundle contract (what search reads)
        "Bundle": "bundle",
        "BundleError": "bundle",
        "ImageHit": "bundle",
        "CaptionHit": "bundle",
        "Manifest": "bundle",
        "read_manifest": "bundle",
        "manifest_stamp": "bundle",
        "ImageFilter": "bundle",
        "FilterError": "bundle",
        "CatalogError": "catalog",
        # where the vectors live (FAISS files, Milvus, pgvector)
        "StoreError": "stores",
        "store_kind": "stores",
    },
)
