"""What every peer shim shares: its arguments, the thread and core pinning, the timed
query loop and the one JSON line it prints (read by bench/peers.py).

Shims run inside a peer's own venv, so this module imports nothing beyond the standard
library (and numpy, which every peer has).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

WARMUP_QUERIES = 5  # untimed: first-call allocations, lazy sessions, caches warmed


def parse_args() -> argparse.Namespace:
    """--phase index|query, the folder, a work dir, the shared checkpoint, threads, queries."""
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=["index", "query"], required=True)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--queries", type=Path, help="JSON list of query strings (query phase)")
    p.add_argument("--k", type=int, default=10)
    return p.parse_args()


def pin(threads: int) -> None:
    """Run on `threads` cores (the first ones allowed) with that many threads per pool.

    Called before torch / onnxruntime / FAISS are imported: the OpenMP and BLAS pools read
    these variables when they start, and onnxruntime (rclip) sizes its pool from the
    affinity mask.
    """
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def timed_queries(queries: list[str], run: Callable[[str], list[str]]) -> dict:
    """Milliseconds of `run(q)` per query, one at a time, after untimed warm-up queries;
    also the first query's top paths (a check that the peers rank with the same model)."""
    for q in queries[:WARMUP_QUERIES]:
        run(q)
    ms = []
    first: list[str] = []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        paths = run(q)
        ms.append((time.perf_counter() - t0) * 1000)
        if i == 0:
            first = [os.path.basename(p) for p in paths]
    return {"query_ms": ms, "first_top": first}


def emit(**fields) -> None:
    """The shim's result: one JSON line, last on stdout."""
    print("\n" + json.dumps(fields), flush=True)  # progress bars leave lines unfinished
