"""Filtered search latency at 100k vectors: unfiltered vs a filter keeping 1% and 50%.

The index types the indexer builds (``indexer/ann.py``): exact ``IDMap2,Flat`` and, at
this size, ``IVF{nlist},Flat`` with nprobe tuned as ``xmodal index`` tunes it. The
vectors are random unit vectors at the photo model's width (384) around 2000 random
centres (uniform ones need every IVF list probed), ids are catalog-like (1..N); the
filters keep a random 1% / 50% of the ids. Each query searches alone, on
``--threads`` threads (1: a web worker's setting), through ``search_within`` exactly as
search does (the id selector is built per query, inside the timing), and asks for
k = 24 (a page). Reported: p50/p99 in ms and the ratio of each filtered p50 to the
unfiltered p50 measured in the same run, plus the results returned (always k here).

The catalog side of a filter (``Bundle.filter_ids``: one SQL query giving the ids that
pass) is timed too, uncached (a bundle keeps its last 16 filters' ids), on a SQLite
catalog of N image rows: a 1% filter (min_width), a 50% one (type), a 1% folder.

Usage: .venv/bin/python bench/filter_latency.py [--n 100000] [--queries 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
from sqlalchemy import insert
from xmodal.crossmodal.threads import configure_threads
from xmodal.indexer import ann
from xmodal.indexer.bundle import Bundle
from xmodal.indexer.catalog import INDEXED, ImageRow, Root, migrate, open_engine, sqlite_url
from xmodal.indexer.filters import ImageFilter, search_within

DIM = 384
K = 24
SHARES = (0.01, 0.5)
TOPICS = 2000  # centres the vectors lie around
SPREAD = 1.2  # noise norm around a (unit) centre


def _unit(rng: np.random.Generator, n: int, centres: np.ndarray | None = None) -> np.ndarray:
    """Random unit vectors; around random centres (a collection's topics) when given,
    so an IVF index has structure to use (uniform ones need every list probed)."""
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    if centres is not None:
        x = (centres[rng.integers(0, len(centres), n)] + SPREAD * x / np.sqrt(DIM)).astype(
            np.float32
        )
    faiss.normalize_L2(x)
    return x


def _times(fn, queries: np.ndarray) -> tuple[list[float], int]:
    out, least = [], K
    fn(queries[:1])  # warm
    for q in queries:
        t = time.perf_counter()
        _, ids = fn(q[None, :])
        out.append((time.perf_counter() - t) * 1000)
        least = min(least, int((ids >= 0).sum()))
    return out, least


def _pct(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def bench_index(factory: str, x: np.ndarray, ids: np.ndarray, queries: np.ndarray, rng) -> dict:
    t = time.perf_counter()
    train = x[rng.permutation(len(x))[: ann.training_size(factory, len(x))]]
    index = ann.build(factory, DIM, train)
    ann.add(index, ids, x)
    nprobe = ann.tune_nprobe(index, x, ids)
    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe
    row: dict = {"factory": factory, "nprobe": nprobe, "build_s": round(time.perf_counter() - t, 1)}
    ms, got = _times(lambda q: index.search(q, K), queries)
    row["unfiltered"] = {**_pct(ms), "results_min": got}
    for share in SHARES:
        allowed = np.sort(rng.choice(ids, int(len(ids) * share), replace=False))
        ms, got = _times(lambda q, a=allowed: search_within(index, q, K, a), queries)
        stats = {**_pct(ms), "results_min": got, "kept": len(allowed)}
        stats["p50_vs_unfiltered"] = round(stats["p50_ms"] / row["unfiltered"]["p50_ms"], 2)
        row[f"filter_{share:.0%}"] = stats
    return row


def bench_catalog(n: int) -> dict:
    """Time Bundle.filter_ids on a SQLite catalog of n indexed image rows."""
    with tempfile.TemporaryDirectory() as tmp:
        url = sqlite_url(Path(tmp) / "catalog.sqlite")
        engine = open_engine(url)
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(insert(Root).values(id=1, path=b"/photos"))
            rows = [
                {
                    "root_id": 1,
                    "relpath": f"{i % 100}/{i}.jpg".encode(),
                    "display": f"{i % 100}/{i}.jpg",
                    "size": 1000,
                    "mtime_ns": i,
                    "taken_ns": i,
                    "width": 4000 if i % 100 == 0 else 640,  # 1% wide
                    "height": 480,
                    "format": "PNG" if i % 2 else "JPEG",  # 50% PNG
                    "status": INDEXED,
                }
                for i in range(1, n + 1)
            ]
            conn.execute(insert(ImageRow), rows)
        bundle = SimpleNamespace(engine=engine, public_catalog_url=lambda: url, path=tmp)
        out = {}
        for name, flt in (
            ("filter_1%", ImageFilter(min_width=4000)),
            ("filter_50%", ImageFilter(types=("png",))),
            ("folder_1%", ImageFilter(folder="7")),
        ):
            ms = []
            for _ in range(20):
                t = time.perf_counter()
                got = Bundle._query_filter_ids.__wrapped__(_WithFolders(bundle), flt)
                ms.append((time.perf_counter() - t) * 1000)
            out[name] = {**_pct(ms), "kept": len(got)}
        engine.dispose()
    return out


class _WithFolders(SimpleNamespace):
    """The stand-in bundle with Bundle's folder clause (filter_ids calls it on self)."""

    def __init__(self, base: SimpleNamespace) -> None:
        super().__init__(**vars(base))
        self._folder_clause = Bundle._folder_clause


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    configure_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = _unit(rng, TOPICS)
    x = _unit(rng, args.n, centres)
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    queries = _unit(rng, args.queries, centres)
    report = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_avg": [round(v, 2) for v in os.getloadavg()],
        "n": args.n,
        "dim": DIM,
        "k": K,
        "threads": args.threads,
        "queries": args.queries,
        "indexes": [
            bench_index(f, x, ids, queries, rng)
            for f in ("IDMap2,Flat", ann.choose_factory(args.n))
        ],
        "catalog_filter_ids": bench_catalog(args.n),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
