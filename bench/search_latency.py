"""Search latency and recall at 100k and 1M vectors: the chosen ANN index vs exact search.

Synthetic collections that resemble real embeddings: each vector is a random convex
mix of three demo test image embeddings (default model) plus noise; queries are real caption
embeddings, as users' text queries are. Reports single-query latency p50/p99 for the
index `xmodal index` would choose (with its tuned nprobe) and for exact flat search in
the same run, recall@10 against exact, build time and index memory per vector.

Usage: .venv/bin/python bench/search_latency.py [--sizes 100000,1000000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import faiss
import numpy as np
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.pairs import read_pairs
from xmodal.crossmodal.threads import configure_threads, thread_settings
from xmodal.indexer import ann
from xmodal.search.evaluate import embed_pairs


def base_embeddings(pairs_file: str) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, caption embeddings) of the demo test split."""
    enc = Encoder.load()
    pairs = read_pairs(pairs_file)
    images, _, _ = embed_pairs(enc, pairs, progress=False)
    return images, enc.encode_texts(pairs.captions)


def synthetic(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors on the embeddings' manifold: random convex mixes of three demo
    embeddings plus noise. Tight clusters of near-copies of 1,000 points would make
    "the top 10" a coin toss among hundreds of ties; mixtures give a continuous,
    clustered density in which nearest neighbours mean something, as with real photos.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        w = rng.dirichlet((1.0, 1.0, 1.0), size=m)  # [m, 3]
        idx = rng.integers(0, len(base), (m, 3))
        noise = rng.normal(scale=0.15 / np.sqrt(base.shape[1]), size=(m, base.shape[1]))
        x = np.einsum("mk,mkd->md", w, base[idx]) + noise
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latencies(index: faiss.Index, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-query milliseconds, one query at a time."""
    index.search(queries[:5], k)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        out.append((time.perf_counter() - t0) * 1000)
    return np.array(out)


def run(size: int, base: np.ndarray, queries: np.ndarray) -> dict:
    """One collection size."""
    x = synthetic(base, size)
    ids = np.arange(1, size + 1, dtype=np.int64)
    factory = ann.choose_factory(size)
    t0 = time.perf_counter()
    index = ann.build(factory, x.shape[1], x[: ann.training_size(factory, size)])
    ann.add(index, ids, x)
    nprobe = ann.tune_nprobe(index, x[:20_000], ids[:20_000])
    build_s = time.perf_counter() - t0
    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    flat.add_with_ids(x, ids)
    recall = ann.recall_at_10(index, flat, queries)
    ann_ms = latencies(index, queries)
    flat_ms = latencies(flat, queries[:200])
    bytes_ = faiss.serialize_index(index).nbytes
    return {
        "vectors": size,
        "dim": int(x.shape[1]),
        "index": factory,
        "nprobe": nprobe,
        "build_s": round(build_s, 1),
        "recall_at_10": round(recall, 4),
        "ann_ms_p50": round(float(np.percentile(ann_ms, 50)), 3),
        "ann_ms_p99": round(float(np.percentile(ann_ms, 99)), 3),
        "flat_ms_p50": round(float(np.percentile(flat_ms, 50)), 3),
        "flat_ms_p99": round(float(np.percentile(flat_ms, 99)), 3),
        "speedup_p50": round(float(np.percentile(flat_ms, 50) / np.percentile(ann_ms, 50)), 1),
        "bytes_per_vector": round(bytes_ / size, 1),
    }


def main() -> None:
    """Run every size and print JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--pairs", default="data/demo/test.jsonl")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/torch threads (serving: 1)")
    args = ap.parse_args()
    configure_threads(args.threads)
    images, captions = base_embeddings(args.pairs)
    rng = np.random.default_rng(1)
    queries = captions[rng.choice(len(captions), 1000, replace=False)]
    print(json.dumps({"machine": platform.platform(), "threads": thread_settings()}), flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(run(size, images, queries)), flush=True)


if __name__ == "__main__":
    main()
