"""Damaging a SQLite catalog on purpose, for the tests of what readers do with it."""

from __future__ import annotations

import gc
import random
import sqlite3
from pathlib import Path


def checkpoint(path: Path) -> None:
    """Move SQLite's WAL into the main file, so damage to the file is what readers see."""
    gc.collect()  # connections of finished runs' engines, still pooled
    with sqlite3.connect(path) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0


def page_size(db: Path) -> int:
    """The database's page size in bytes."""
    with sqlite3.connect(db) as conn:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])


def root_page(db: Path, table: str) -> int:
    """The 1-based number of a table's root page."""
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))
        return int(row.fetchone()[0])


def garble(path: Path, offset: int, length: int, seed: int = 0) -> None:
    """Overwrite ``length`` bytes at ``offset`` with seeded random bytes."""
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(rnd.randrange(256) for _ in range(length)))


def garble_table_page(db: Path, table: str, seed: int = 0) -> None:
    """Overwrite the whole root page of ``table`` with random bytes."""
    size = page_size(db)
    garble(db, (root_page(db, table) - 1) * size, size, seed)
