"""What a bundle holds: model, counts, index types and sizes, last run, failures.

Shared by `xmodal info` and the web status page; reads through indexer.bundle only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.indexer.bundle import Bundle


def bundle_status(
    bundle: Path | Bundle, db_url: str | None = None, failures_limit: int | None = 20
) -> dict[str, Any]:
    """A JSON-ready description of the bundle."""
    b = bundle if isinstance(bundle, Bundle) else Bundle(Path(bundle), db_url)
    try:
        m = b.manifest
        indexes = {}
        for kind, info in m.indexes.items():
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
        }
    finally:
        if not isinstance(bundle, Bundle):
            b.close()
