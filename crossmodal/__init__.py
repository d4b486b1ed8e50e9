"""The model layer xmodal runs on: open_clip loading and identity, the encoder, the
cross-attention reranker and CoCa scorer, image decoding, pair files, retrieval metrics,
thread settings and the project's errors. Training lives apart, in ``xmodal.training``.

Names load on first use (``crossmodal.lazy``): importing the package is cheap.
"""

from .lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        # errors
        "XmodalError": "errors",
        "ModelError": "errors",
        "DataError": "errors",
        # models: identity, loading, registry
        "ModelIdentity": "loading",
        "LoadedModel": "loading",
        "load_model": "loading",
        "default_model_dir": "loading",
        "LOCAL_DIR": "loading",
        "CONFIG_FILE": "loading",
        "WEIGHTS_FILE": "loading",
        "ensure_known_model": "loading",
        "quiet_model_build": "loading",
        "read_local_dir_config": "loading",
        "BUILTIN_MODELS": "registry",
        "DEFAULT_MODEL": "registry",
        "SHAPES_MODEL": "registry",
        "NUM_CLASSES": "photo",
        "model_config": "registry",
        "register_config": "registry",
        "sha256_file": "registry",
        # encoders and scorers
        "Encoder": "encoder",
        "load_encoder": "encoder",
        "CrossModalReranker": "reranker",
        "RerankerConfig": "reranker",
        "itm_loss": "reranker",
        "pad_tokens": "reranker",
        "CocaScorer": "coca_scorer",
        "is_coca": "coca_scorer",
        "MatchScorer": "scoring",
        "fusion_weight": "scoring",
        # match probabilities
        "Calibration": "calibration",
        "Platt": "calibration",
        "LABEL_BANDS": "calibration",
        "WEAK": "calibration",
        "CALIBRATION_FILE": "calibration",
        "read_calibration": "calibration",
        "match_label": "calibration",
        "expected_calibration_error": "calibration",
        # images and pair files
        "ImageDecodeError": "images",
        "allowed_formats": "images",
        "decode_image": "images",
        "decode_upload": "images",
        "QUERY_SIDE": "images",
        "PairSet": "pairs",
        "read_pairs": "pairs",
        "ImageFailure": "pair_images",
        "decode_pair_images": "pair_images",
        "describe_failures": "pair_images",
        "load_pair_images": "pair_images",
        # metrics
        "retrieval_recall": "metrics",
        "recall_at": "metrics",
        "text_to_image_ranks": "metrics",
        "image_to_text_ranks": "metrics",
        "average_precision": "metrics",
        "precision_at_k": "metrics",
        "r_precision": "metrics",
        "ndcg_at_k": "metrics",
        "ranked_relevance": "metrics",
        "query_metrics": "metrics",
        "query_set_metrics": "metrics",
        "AP_K": "metrics",
        # package plumbing
        "lazy_exports": "lazy",
        # threads
        "configure_threads": "threads",
        "default_threads": "threads",
        "ensure_threads_configured": "threads",
        "MAX_THREADS": "threads",
        "THREADS_ENV": "threads",
        "PASS_SIZE": "threads",
        "InferenceStreams": "threads",
        "Passes": "threads",
        "inference_streams": "threads",
    },
)
