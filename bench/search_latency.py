"""Search latency and recall at 100k and 1M vectors: the chosen ANN index vs exact search,
and a text query's latency (encoding the typed words, then the search) on one thread.

Text query: typed queries of a few words, one at a time, through the model's text tower
(the default, the photo model), p50/p99 of encoding alone; with the ANN runs, also of
encoding plus search at each size.

Synthetic collections that resemble real embeddings: each vector is a random convex
mix of three demo test image embeddings (default model) plus noise; queries are real caption
embeddings, as users' text queries are. Reports single-query latency p50/p99 for the
index `xmodal index` would choose (with its tuned nprobe) and for exact flat search in
the same run, recall@10 against exact, build time and index memory per vector. Without
the demo corpus (``--pairs``) only the text query is measured.

Usage: .venv/bin/python bench/search_latency.py [--sizes 100000,1000000] [--threads 1]
       [--model xmodal-photo]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.pairs import read_pairs
from xmodal.crossmodal.threads import configure_threads, thread_settings
from xmodal.indexer import ann
from xmodal.search.evaluate import embed_pairs

# What people type: a few words, distinct (nothing here caches), several lengths.
TEXT_QUERIES = (
    "a cat",
    "a dog on the grass",
    "a cup of coffee",
    "a red car parked on the street",
    "a rocket",
    "an astronaut in a space suit",
    "a bowl of fruit on a table",
    "a person riding a bicycle",
    "a sailing boat on the sea",
    "a bird sitting on a branch",
    "a plate of pasta",
    "a city skyline at night",
    "a man holding a camera",
    "a black and white photo",
    "a tripod",
    "a motorcycle",
    "a glass of red wine",
    "snow covered mountains under a blue sky",
    "a teddy bear",
    "a laptop on a desk next to a lamp",
)
TEXT_ROUNDS = 10  # each query this many times: 200 timed queries


def text_query_ms(enc: Encoder, search: faiss.Index | None = None) -> np.ndarray:
    """Milliseconds per typed query, one at a time: encoding, plus the search if given."""
    enc.encode_texts(["warm-up"])
    out = []
    for _ in range(TEXT_ROUNDS):
        for q in TEXT_QUERIES:
            t0 = time.perf_counter()
            v = enc.encode_texts([q])
            if search is not None:
                search.search(v, 10)
            out.append((time.perf_counter() - t0) * 1000)
    return np.array(out)


def _p(ms: np.ndarray, q: float) -> float:
    return round(float(np.percentile(ms, q)), 2)


def base_embeddings(enc: Encoder, pairs_file: str) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, caption embeddings) of the demo test split."""
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


def run(size: int, base: np.ndarray, queries: np.ndarray, enc: Encoder) -> dict:
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
    text_ms = text_query_ms(enc, index)
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
        "text_query_total_ms_p50": _p(text_ms, 50),
        "text_query_total_ms_p99": _p(text_ms, 99),
    }


def main() -> None:
    """Run every size and print JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--pairs", default="data/demo/test.jsonl")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/torch threads (serving: 1)")
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    args = ap.parse_args()
    configure_threads(args.threads)
    enc = Encoder.load(args.model)
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
    text_ms = text_query_ms(enc)
    print(
        json.dumps(
            {
                "model": enc.identity.name,
                "text_query_encode_ms_p50": _p(text_ms, 50),
                "text_query_encode_ms_p99": _p(text_ms, 99),
                "queries": len(text_ms),
            }
        ),
        flush=True,
    )
    if not Path(args.pairs).exists():
        print(json.dumps({"skipped": f"ANN runs: no {args.pairs} (xmodal demo-corpus)"}))
        return
    images, captions = base_embeddings(enc, args.pairs)
    rng = np.random.default_rng(1)
    queries = captions[rng.choice(len(captions), 1000, replace=False)]
    for size in (int(s) for s in args.sizes.split(",") if s):
        print(json.dumps(run(size, images, queries, enc)), flush=True)


if __name__ == "__main__":
    main()
