"""Load on loopback against `xmodal serve` with the demo bundle grown to 100k vectors.

1. Copy the demo bundle and grow its image collection to --vectors with synthetic rows
   whose vectors lie around the real demo embeddings (so the index has real
   neighbourhoods); the indexer's own sync then builds the index it would choose.
2. Start `xmodal serve` (waitress) on it.
3. Send text queries from --clients concurrent keep-alive connections: first all
   distinct (every query misses the embedding cache), then repeated ones (hits).

Reports queries/s and p50/p99 latency for each phase.
Usage: .venv/bin/python bench/serve_load.py [--vectors 100000] [--queries 600]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.bundle import Bundle
from xmodal.indexer.catalog import INDEXED, ImageRow
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.training.corpus import CorpusSpec, captions, plan_splits


def grow(src: Path, dst: Path, total: int) -> None:
    """Copy a bundle and add synthetic indexed rows until it holds ``total`` images."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("thumbnails"))
    b = Bundle(dst)
    with Session(b.engine) as s:
        rows = s.execute(select(ImageRow.id, ImageRow.root_id, ImageRow.vector)).all()
    base = np.stack([np.frombuffer(r.vector, np.float32) for r in rows if r.vector])
    root_id = rows[0].root_id
    rng = np.random.default_rng(0)
    need = total - len(base)
    with Session(b.engine) as s, s.begin():
        for start in range(0, need, 20_000):
            m = min(20_000, need - start)
            x = base[rng.integers(0, len(base), m)] + rng.normal(
                scale=0.06, size=(m, base.shape[1])
            )
            x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
            s.execute(
                insert(ImageRow),
                [
                    {
                        "root_id": root_id,
                        "relpath": f"synthetic/{start + i:07d}.png".encode(),
                        "display": f"synthetic/{start + i:07d}.png",
                        "size": 1,
                        "mtime_ns": 0,
                        "status": INDEXED,
                        "vector": v.tobytes(),
                        "width": 128,
                        "height": 128,
                        "format": "PNG",
                    }
                    for i, v in enumerate(x)
                ],
            )
    b.close()
    run_index(Encoder.load("xmodal-shapes"), IndexOptions(bundle=dst, workers=0, progress=False))


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(port: int, queries: list[str], clients: int, rerank: int = 0) -> dict:
    """Send every query once over ``clients`` keep-alive connections; collect latencies."""
    lat: list[float] = []
    lock = threading.Lock()
    it = iter(queries)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                q = next(it, None)
            if q is None:
                break
            t0 = time.perf_counter()
            conn.request(
                "GET", "/api/search?" + urllib.parse.urlencode({"q": q, "k": 10, "rerank": rerank})
            )
            resp = conn.getresponse()
            body = resp.read()
            ms = (time.perf_counter() - t0) * 1000
            assert resp.status == 200, body[:200]
            with lock:
                lat.append(ms)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    arr = np.array(lat)
    return {
        "queries": len(arr),
        "qps": round(len(arr) / wall, 1),
        "ms_p50": round(float(np.percentile(arr, 50)), 1),
        "ms_p99": round(float(np.percentile(arr, 99)), 1),
    }


def main() -> None:
    """Grow, serve, load, report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="data/demo/bundle")
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=600)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--server-threads", type=int, default=2)
    ap.add_argument(
        "--rerank",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: rerank the top 32 (synthetic rows have no files, so only real ones rerank)",
    )
    args = ap.parse_args()
    grown = Path(tempfile.gettempdir()) / f"xmodal-bench-grown-{args.vectors}"
    grow(Path(args.bundle), grown, args.vectors)
    scenes = plan_splits(CorpusSpec(seed=9, train_size=0, val_size=0, test_size=args.queries))
    distinct = [captions(s)[i % 4] for i, s in enumerate(scenes["test"])]
    repeated = [distinct[i % 20] for i in range(args.queries)]
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xmodal",
            "serve",
            "--bundle",
            str(grown),
            "--port",
            str(port),
            "--threads",
            str(args.server_threads),
        ],
        env=env,
    )
    try:
        for _ in range(300):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/api/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        load(port, [f"warm up {i}" for i in range(20)], args.clients)
        report = {
            "machine": platform.platform(),
            "cores": os.cpu_count(),
            "vectors": args.vectors,
            "index": json.loads((grown / "manifest.json").read_text())["indexes"]["images"],
            "clients": args.clients,
            "server_threads": args.server_threads,
            "rerank": args.rerank,
            "distinct_cache_miss": load(port, distinct, args.clients, args.rerank),
            "repeated_cache_hit": load(port, repeated, args.clients, args.rerank),
        }
        print(json.dumps(report, indent=2))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
