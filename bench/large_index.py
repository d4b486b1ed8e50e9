"""A collection larger than memory on one machine: ``--max-index-memory``'s compressed
index at 10 million vectors, reranked exactly from the stored vectors on disk.

The vectors: synthetic unit vectors around real embeddings (random convex mixes of three
demo image embeddings of the shapes model plus noise, as bench/search_latency.py makes
them), written in chunks to a float32 memmap on disk, which plays the catalog's stored
vectors (10M x 256: 10 GB, more than the index budget). The index is the one
``xmodal index --max-index-memory BUDGET`` picks (``compressed.choose_within_budget``),
trained on a sample and filled in chunks. Queries are real caption embeddings of the
same demo split (what users type), split in two: a validation half tunes nprobe (the
smallest power of two whose reranked recall@10 reaches ann.TARGET_RECALL), the test
half is reported once; held-out synthetic vectors ("more like this") are reported too.
The truth is exact search over every stored vector, in chunks.

Reports: the factory, the estimate, the index file size and the RSS it adds when loaded,
train and add times, recall@10 against exact with and without the rerank, and p50/p99
of one reranked query at a time on one thread (``--threads``).

Usage: .venv/bin/python bench/large_index.py [--n 10000000] [--budget 2GB]
       [--workdir /tmp/xmodal-large] [--threads 1] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.threads import configure_threads
from xmodal.indexer import ann, compressed
from xmodal.search.evaluate import embed_pairs, read_pairs
from xmodal.training.corpus import CorpusSpec, write_corpus

CHUNK = 250_000  # vectors generated, added or scanned at a time
K = 10


def loaded_rss(path: Path) -> int:
    """Bytes of RSS that reading the index file adds, in a fresh process (this one's
    allocator would reuse the memory the built index freed)."""
    code = (
        "import faiss, sys\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "b = rss(); i = faiss.read_index(sys.argv[1]); print(rss() - b)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True
    )
    return int(run.stdout.split()[-1])


def demo_embeddings(enc: Encoder, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, caption embeddings) of a freshly generated demo test split."""
    root = Path(tempfile.mkdtemp(prefix="xmodal-large-demo-"))
    try:
        spec = CorpusSpec(seed=5, train_size=1, val_size=1, test_size=n_images, test_shifted_size=0)
        write_corpus(root, spec, progress=False)
        pairs = read_pairs(str(root / "test.jsonl"))
        images, _, _ = embed_pairs(enc, pairs, progress=False)
        return images, enc.encode_texts(pairs.captions)
    finally:
        shutil.rmtree(root)


def write_vectors(path: Path, base: np.ndarray, n: int, seed: int = 0) -> np.memmap:
    """n synthetic unit vectors around ``base`` into a float32 memmap at ``path``."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, base.shape[1]))
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        w = rng.dirichlet((1.0, 1.0, 1.0), size=m)  # [m, 3]
        idx = rng.integers(0, len(base), (m, 3))
        noise = rng.normal(scale=0.15 / np.sqrt(base.shape[1]), size=(m, base.shape[1]))
        x = np.einsum("mk,mkd->md", w, base[idx]) + noise
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return out


def exact_top(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[Q, K] ids (1-based, as catalog ids) of exact inner-product search, in chunks."""
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.zeros((len(queries), K), np.int64)
    for start in range(0, len(vectors), CHUNK):
        s = queries @ np.asarray(vectors[start : start + CHUNK]).T  # [Q, chunk]
        top = np.argpartition(-s, K, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + start + 1], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


def recall(found: list[np.ndarray] | np.ndarray, truth: np.ndarray) -> float:
    """Mean overlap of each row's top K with the exact top K."""
    return float(np.mean([len(set(f[:K]) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    """Build, tune, measure; print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--budget", default="2GB")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/xmodal-large"))
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads for the queries")
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--demo-images", type=int, default=400)
    ap.add_argument("--keep", action="store_true", help="keep the vectors and the index")
    args = ap.parse_args()
    configure_threads(args.build_threads)
    budget = compressed.parse_memory(args.budget)
    args.workdir.mkdir(parents=True, exist_ok=True)
    out: dict = {
        "bench": "large_index",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        "n": args.n,
        "budget_bytes": budget,
    }
    enc = Encoder.load("xmodal-shapes")
    images, captions = demo_embeddings(enc, args.demo_images)
    dim = images.shape[1]
    t0 = time.perf_counter()
    stored = args.workdir / "vectors.npy"
    if args.keep and stored.exists():  # the same seed gives the same vectors: reuse them
        vectors = np.load(stored, mmap_mode="r")
    if not (args.keep and stored.exists()) or vectors.shape != (args.n, images.shape[1]):
        vectors = write_vectors(stored, images, args.n)
    out["generate_s"] = round(time.perf_counter() - t0, 1)
    factory = compressed.choose_within_budget(args.n, dim, budget)
    out |= {"dim": dim, "factory": factory}
    out["estimated_bytes"] = compressed.estimate_bytes(factory, args.n, dim)

    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(args.n, ann.training_size(factory, args.n), replace=False))
    t0 = time.perf_counter()
    index = ann.build(factory, dim, np.asarray(vectors[sample]))
    out["train_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for start in range(0, args.n, CHUNK):
        stop = min(start + CHUNK, args.n)
        ann.add(index, np.arange(start + 1, stop + 1, dtype=np.int64), vectors[start:stop])
    out["add_s"] = round(time.perf_counter() - t0, 1)
    path = args.workdir / "index.faiss"
    faiss.write_index(index, str(path))
    out["index_file_bytes"] = path.stat().st_size
    del index
    out["index_rss_bytes"] = loaded_rss(path)
    index = faiss.read_index(str(path))

    # Queries: real captions (validation half tunes, test half reports) and held-out
    # synthetic vectors (not in the collection: another seed's mixes).
    order = np.random.default_rng(2).permutation(len(captions))
    val_q = np.ascontiguousarray(captions[order[:200]], np.float32)
    test_q = np.ascontiguousarray(captions[order[200:400]], np.float32)
    held_val = np.array(write_vectors(args.workdir / "hv.npy", images, 200, seed=11))
    held_q = np.array(write_vectors(args.workdir / "ht.npy", images, 200, seed=12))
    t0 = time.perf_counter()
    sets = {"val": val_q, "held_val": held_val, "test": test_q, "held": held_q}
    truth = {name: exact_top(vectors, q) for name, q in sets.items()}
    out["exact_truth_s"] = round(time.perf_counter() - t0, 1)

    def exact(ids: np.ndarray) -> np.ndarray:
        return np.asarray(vectors[np.asarray(ids) - 1])

    ivf = faiss.extract_index_ivf(index)
    configure_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    # Tuned on both validation sets (captions and "more like this" vectors): the smallest
    # nprobe at which the worse of the two reaches the target.
    tuning = {}
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        worst = min(
            recall([g[1] for g in compressed.search_reranked(index, sets[v], K, exact)], truth[v])
            for v in ("val", "held_val")
        )
        tuning[nprobe] = round(worst, 4)
        if worst >= ann.TARGET_RECALL or nprobe >= ivf.nlist:
            break
        nprobe *= 2
    out |= {"k_factor": compressed.K_FACTOR, "nprobe": nprobe, "val_worst_recall_by_nprobe": tuning}
    for name, q in (("test", test_q), ("held", held_q)):
        got = compressed.search_reranked(index, q, K, exact)
        _, plain = index.search(q, K)
        out[f"recall10_{name}_reranked"] = round(recall([g[1] for g in got], truth[name]), 4)
        out[f"recall10_{name}_without_rerank"] = round(recall(plain, truth[name]), 4)
    compressed.search_reranked(index, test_q[:5], K, exact)  # warm
    ms = []
    for q in test_q:
        t0 = time.perf_counter()
        compressed.search_reranked(index, q[None], K, exact)
        ms.append((time.perf_counter() - t0) * 1000)
    out["query_ms_p50"] = round(float(np.percentile(ms, 50)), 2)
    out["query_ms_p99"] = round(float(np.percentile(ms, 99)), 2)
    out["query_threads"] = args.threads
    out["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out, indent=1), flush=True)
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
