"""What the subprocess tests share: the `xmodal index` command line they run (tiny model,
one thread) and a read-only look at how far a run has committed."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path


def index_command(checkpoint: Path, *args: str, workers: int = 0) -> list[str]:
    """``python -m xmodal index ARGS`` with the tiny test model and ``workers`` decoders."""
    return [
        sys.executable,
        "-m",
        "xmodal",
        "--threads",
        "1",
        "index",
        *args,
        "--model",
        "xmodal-tiny",
        "--pretrained",
        str(checkpoint),
        "--workers",
        str(workers),
    ]


def committed_images(bundle: Path) -> int:
    """Indexed rows a (possibly running) run has committed, read without locking it."""
    db = bundle / "catalog.sqlite"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("select count(*) from images where status='indexed'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0
