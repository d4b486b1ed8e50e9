"""Encoder throughput: images/s, texts/s and single-query text latency (p50/p99).

Runs the built-in photo and shapes models and the ViT-B-32 architecture (random weights: the
timing is the same as with trained ones) side by side in one process, with the thread
settings printed. Usage:

    .venv/bin/python bench/encoder_throughput.py [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.threads import configure_threads, thread_settings
from xmodal.training.corpus import CorpusSpec, captions, plan_splits


def _captions(n: int) -> list[str]:
    scenes = plan_splits(CorpusSpec(seed=1, train_size=0, val_size=0, test_size=n))["test"]
    return [captions(s)[i % 4] for i, s in enumerate(scenes)]


def measure(encoder: Encoder, texts: list[str], image_batches: int, batch: int) -> dict:
    """Throughput and latency figures for one encoder."""
    h, w = encoder.image_size
    x = torch.randn(batch, 3, h, w)
    encoder.encode_image_tensors(x[:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(image_batches):
        encoder.encode_image_tensors(x)
    images_per_s = image_batches * batch / (time.perf_counter() - t0)

    encoder.encode_texts(texts[:8])
    t0 = time.perf_counter()
    encoder.encode_texts(texts, batch_size=256)
    texts_per_s = len(texts) / (time.perf_counter() - t0)

    latencies = []
    for text in texts[:200]:
        t0 = time.perf_counter()
        encoder.encode_texts([text])
        latencies.append((time.perf_counter() - t0) * 1000)
    return {
        "model": encoder.identity.name,
        "image_size": list(encoder.image_size),
        "images_per_s": round(images_per_s, 1),
        "texts_per_s": round(texts_per_s, 1),
        "text_query_ms_p50": round(float(np.percentile(latencies, 50)), 2),
        "text_query_ms_p99": round(float(np.percentile(latencies, 99)), 2),
    }


def main() -> None:
    """Run the benchmark and print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_threads(args.threads)
    texts = _captions(1024)
    rows = [
        measure(Encoder.load("xmodal-photo"), texts, image_batches=4, batch=64),
        measure(Encoder.load("xmodal-shapes"), texts, image_batches=20, batch=64),
        measure(Encoder.load("ViT-B-32"), texts, image_batches=4, batch=32),
    ]
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "torch": torch.__version__,
        "threads": thread_settings(),
        "results": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"threads: {report['threads']}")
    print(f"{'model':<22}{'img/s':>9}{'text/s':>9}{'q p50 ms':>10}{'q p99 ms':>10}")
    for r in rows:
        print(
            f"{r['model']:<22}{r['images_per_s']:>9}{r['texts_per_s']:>9}"
            f"{r['text_query_ms_p50']:>10}{r['text_query_ms_p99']:>10}"
        )


if __name__ == "__main__":
    main()
