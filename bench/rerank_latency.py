"""Query latency with and without cross-attention reranking, side by side.

The shapes model on the demo bundle, both directions: a text query for images and an
image query for captions. Every query is distinct (no embedding cache), alternating
dual-only and reranked so both see the same machine state. Run with one torch thread,
as each `xmodal serve` request thread does, and optionally more.

Usage: .venv/bin/python bench/rerank_latency.py --bundle data/demo/bundle [--k 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import numpy as np
from xmodal.crossmodal.threads import configure_threads, thread_settings
from xmodal.search.engine import SearchEngine
from xmodal.training.corpus import CorpusSpec, captions, plan_splits, render


def main() -> None:
    """Measure and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="data/demo/bundle")
    ap.add_argument("--k", type=int, default=32, help="candidates reranked")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    scenes = plan_splits(CorpusSpec(seed=21, train_size=0, val_size=0, test_size=args.queries))
    queries = [captions(s)[i % 4] for i, s in enumerate(scenes["test"])]
    engine = SearchEngine(args.bundle)
    if engine.reranker is None:
        raise SystemExit(f"the model of {args.bundle} has no reranker")
    images = [render(s, random.Random(i)) for i, s in enumerate(scenes["test"])]
    directions = {
        "text->image": (queries, engine.text_to_images),
        "image->text": (images, engine.image_to_captions),
    }
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        configure_threads(threads)
        for direction, (qs, search) in directions.items():
            for q in qs[:10]:  # warm-up
                search(q, k=10, rerank=True, rerank_k=args.k)
            dual, reranked = [], []
            for q in qs:
                t0 = time.perf_counter()
                search(q, k=10, rerank=False)
                dual.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                search(q, k=10, rerank=True, rerank_k=args.k)
                reranked.append((time.perf_counter() - t0) * 1000)
            d50, r50 = float(np.percentile(dual, 50)), float(np.percentile(reranked, 50))
            rows.append(
                {
                    "direction": direction,
                    "threads": threads,
                    "dual_ms_p50": round(d50, 2),
                    "dual_ms_p99": round(float(np.percentile(dual, 99)), 2),
                    "reranked_ms_p50": round(r50, 2),
                    "reranked_ms_p99": round(float(np.percentile(reranked, 99)), 2),
                    "added_ms_p50": round(r50 - d50, 2),
                    "ratio_p50": round(r50 / d50, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps(
            {
                "machine": platform.platform(),
                "bundle": args.bundle,
                "images": engine.bundle.manifest.counts.get("images_indexed"),
                "rerank_k": args.k,
                "scorer": engine.reranker.name,
                "threads": thread_settings(),
            }
        )
    )


if __name__ == "__main__":
    main()
