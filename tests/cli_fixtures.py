"""The `xmodal index` command line the subprocess tests run (tiny model, one thread)."""

from __future__ import annotations

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
