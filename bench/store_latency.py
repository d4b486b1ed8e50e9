"""Vector stores side by side at 100k vectors: FAISS (the index `xmodal index` chooses),
Milvus Lite and PostgreSQL with pgvector, each through xmodal's VectorStore interface.

The collection is synthetic around real embeddings, as ``bench/search_latency.py`` builds
it (random convex mixes of three demo image embeddings plus noise); queries are real
caption embeddings. For each store: load time (add of every vector, index included),
recall@10 against exact search, and p50/p99 single-query latency (one query at a time,
k=10), with ratios against FAISS's in the same run. FAISS and torch run on ``--threads``;
Milvus Lite and PostgreSQL run in their own processes with their own threads (reported).

PostgreSQL: ``--pg-url`` (or XMODAL_TEST_PGVECTOR_URL), else a server started by the
``pgserver`` package in a temporary folder.

Usage: .venv/bin/python bench/store_latency.py [--size 100000] [--queries 500] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.pairs import read_pairs
from xmodal.crossmodal.threads import configure_threads, thread_settings
from xmodal.indexer import ann
from xmodal.indexer.stores import kind_store_url, open_store
from xmodal.indexer.stores.faiss_store import FaissStore
from xmodal.search.evaluate import embed_pairs

sys.path.insert(0, str(Path(__file__).parent))
from search_latency import synthetic  # the same collection as that bench

K = 10
BATCH = 20_000  # vectors added per call, as publication adds them


def demo_embeddings(enc: Encoder, pairs_file: str | None, tmp: Path) -> tuple:
    """(image embeddings, caption embeddings) of a demo test split (generated if absent)."""
    if pairs_file is None or not Path(pairs_file).exists():
        from xmodal.training.corpus import CorpusSpec, write_corpus

        spec = CorpusSpec(seed=3, train_size=1, val_size=1, test_size=300, test_shifted_size=0)
        write_corpus(tmp / "corpus", spec, progress=False)
        pairs_file = str(tmp / "corpus" / "test.jsonl")
    pairs = read_pairs(pairs_file)
    images, _, _ = embed_pairs(enc, pairs, progress=False)
    return images, enc.encode_texts(pairs.captions)


def faiss_store(x: np.ndarray, ids: np.ndarray) -> FaissStore:
    """The index `xmodal index` would choose for this size, nprobe tuned as it tunes it."""
    factory = ann.choose_factory(len(x))
    index = ann.build(factory, x.shape[1], x[: ann.training_size(factory, len(x))])
    store = FaissStore(x.shape[1], factory, index)
    for start in range(0, len(x), BATCH):
        store.add(ids[start : start + BATCH], x[start : start + BATCH])
    nprobe = ann.tune_nprobe(index, x[:20_000], ids[:20_000])
    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe
        store.factory = f"{factory} nprobe={nprobe}"
    return store


def measure(name: str, make, x, ids, queries, truth) -> dict:
    """Load, recall@10 against ``truth``, single-query latencies of one store."""
    t0 = time.perf_counter()
    store = make()
    load_s = time.perf_counter() - t0
    try:
        assert store.count == len(x), f"{name} holds {store.count} of {len(x)}"
        store.search(queries[:5], K)  # warm-up
        found = np.empty((len(queries), K), np.int64)
        ms = []
        for n, q in enumerate(queries):
            t = time.perf_counter()
            _, got = store.search(q[None], K)
            ms.append((time.perf_counter() - t) * 1000)
            found[n] = got[0]
        recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)])
        return {
            "store": name,
            "index": store.describe()["factory"],
            "load_s": round(load_s, 1),
            "recall_at_10": round(float(recall), 4),
            "ms_p50": round(float(np.percentile(ms, 50)), 3),
            "ms_p99": round(float(np.percentile(ms, 99)), 3),
        }
    finally:
        store.close()


def pg_base(args: argparse.Namespace, tmp: Path) -> str | None:
    """A PostgreSQL URL with pgvector: given, or a pgserver in ``tmp``; None without one."""
    url = args.pg_url or os.environ.get("XMODAL_TEST_PGVECTOR_URL")
    if url:
        return url
    try:
        import pgserver
    except ImportError:
        return None
    server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
    return server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


def loaded(url: str, x: np.ndarray, ids: np.ndarray):
    """A database store (created empty) with every vector added."""

    def make():
        store = open_store(url, x.shape[1], create=True)
        for start in range(0, len(x), BATCH):
            store.add(ids[start : start + BATCH], x[start : start + BATCH])
        store.flush()
        return store

    return make


def main() -> None:
    """Run every store and print JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--pairs", default="data/demo/test.jsonl")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/torch threads (serving: 1)")
    ap.add_argument("--model", default="xmodal-shapes")
    ap.add_argument("--pg-url", default=None)
    args = ap.parse_args()
    configure_threads(args.threads)
    print(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": platform.platform(),
                "threads": thread_settings(),
                "loadavg": [round(v, 2) for v in os.getloadavg()],
            }
        ),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="xmodal-stores-") as folder:
        tmp = Path(folder)
        enc = Encoder.load(args.model)
        images, captions = demo_embeddings(enc, args.pairs, tmp)
        x = synthetic(images, args.size)
        ids = np.arange(1, args.size + 1, dtype=np.int64)
        rng = np.random.default_rng(1)
        queries = captions[rng.choice(len(captions), args.queries, replace=len(captions) < 500)]
        exact = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
        exact.add_with_ids(x, ids)
        _, truth = exact.search(queries, K)
        rows = [measure("faiss", lambda: faiss_store(x, ids), x, ids, queries, truth)]
        name = f"bench_{uuid.uuid4().hex[:8]}"
        lite = kind_store_url(f"milvus-lite://{tmp}/milvus.db/{name}", "images", None)
        rows.append(measure("milvus-lite", loaded(lite, x, ids), x, ids, queries, truth))
        base = pg_base(args, tmp)
        if base is None:
            print(json.dumps({"skipped": "pgvector: no --pg-url and no pgserver package"}))
        else:
            sep = "&" if "?" in base else "?"
            pg = kind_store_url(f"{base}{sep}table={name}", "images", None)
            rows.append(measure("pgvector", loaded(pg, x, ids), x, ids, queries, truth))
        ref = rows[0]
        for row in rows:
            row["vectors"], row["dim"] = args.size, int(x.shape[1])
            row["p50_vs_faiss"] = round(row["ms_p50"] / ref["ms_p50"], 2)
            row["p99_vs_faiss"] = round(row["ms_p99"] / ref["ms_p99"], 2)
            print(json.dumps(row), flush=True)
    print(json.dumps({"loadavg_end": [round(v, 2) for v in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
