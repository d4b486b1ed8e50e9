"""What a bundle holds: model, counts, index types and sizes, last run, failures.

Shared by `xmodal info` and the web status page; reads through indexer.bundle only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.crossmodal.loading import WEIGHTS_FILE
from xmodal.crossmodal.registry import BUILTIN_MODELS, DEFAULT_MODEL, SHAPES_MODEL, sha256_file
from xmodal.indexer.bundle import Bundle

# The demo corpus's scenes are square PNGs or JPEGs of a few hundred pixels at most
# (96-224 px in the varied style, 128 in the flat one).
DEMO_SCENE_FORMATS = ("PNG", "JPEG")
DEMO_SCENE_MAX_SIDE = 256


def is_demo_scene_like(fmt: str | None, width: int | None, height: int | None) -> bool:
    """Whether an image's format and size are those of a demo-corpus scene."""
    return fmt in DEMO_SCENE_FORMATS and width == height and 0 < (width or 0) <= DEMO_SCENE_MAX_SIDE


def model_advice(bundle: Bundle) -> str | None:
    """A one-line warning when a bundle's model does not fit its files: the shapes model
    (trained on synthetic scenes) over photos finds nothing in them."""
    weights = BUILTIN_MODELS[SHAPES_MODEL] / WEIGHTS_FILE
    if not weights.is_file() or bundle.identity.sha256 != sha256_file(weights):
        return None
    photos = sum(n for f, w, h, n in bundle.image_kinds() if not is_demo_scene_like(f, w, h))
    if not photos:
        return None
    return (
        f"bundle {bundle.path} was built with {SHAPES_MODEL}, a model of the demo corpus's "
        f"synthetic scenes, over {photos} images that are not demo scenes: it cannot find "
        f"things in photos; index them with {DEFAULT_MODEL} (the default: leave out --model) "
        "into a new bundle"
    )


def bundle_status(
    bundle: Path | Bundle, db_url: str | None = None, failures_limit: int | None = 20
) -> dict[str, Any]:
    """A JSON-ready description of the bundle."""
    b = bundle if isinstance(bundle, Bundle) else Bundle(Path(bundle), db_url)
    try:
        m = b.manifest
        indexes = {}
        for kind, info in m.indexes.items():
            if not m.dim(kind):
                continue  # "visual" of a model without a second image space
            size = (b.path / info.file).stat().st_size if info.file else 0
            indexes[kind] = {
                "file": info.file,
                "factory": info.factory,
                "count": info.count,
                "params": info.params,
                "bytes": size,
            }
        catalog_bytes = None
        if m.catalog_url is None:
            catalog_bytes = sum(
                p.stat().st_size for p in b.path.glob("catalog.sqlite*") if p.is_file()
            )
        return {
            "bundle": str(b.path),
            "generation": m.generation,
            "format_version": m.format_version,
            "model": m.model,
            "catalog": b.public_catalog_url(),
            "catalog_bytes": catalog_bytes,
            "indexes": indexes,
            "counts": m.counts,
            "roots": m.roots,
            "created_at": m.created_at,
            "updated_at": m.updated_at,
            "last_run": b.last_run(),
            "failures": b.failures(failures_limit),
            "warning": model_advice(b),
        }
    finally:
        if not isinstance(bundle, Bundle):
            b.close()
