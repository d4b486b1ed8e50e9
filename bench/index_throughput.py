"""Indexing throughput on 1,000 generated 1920x1080 JPEGs, three ways side by side:

(a) the model alone on already-decoded, preprocessed tensors (the ceiling),
(b) a naive loop that opens, preprocesses and encodes one image at a time,
(c) `xmodal index` (decode workers overlapped with batched inference) into a new bundle,
(d) the decode workers alone (read, hash, decode, preprocess; no model).

(a) and (d) give the machine's bound for (c): decoding and inference share the same
cores, so at best 1 / (1/a + 1/d) images/s when each alone already uses every core.

For the built-in default model and the ViT-B-32 architecture (random weights: same
cost). Usage: .venv/bin/python bench/index_throughput.py [--n 1000] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.threads import configure_threads, default_threads, thread_settings
from xmodal.indexer.decode import DecodePool, Job
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.training.corpus import CorpusSpec, plan_splits, render

CACHE = Path(tempfile.gettempdir()) / "xmodal-bench-1080p"


def make_photos(n: int) -> list[Path]:
    """n distinct 1920x1080 JPEGs (demo scenes, upscaled, with noise), cached across runs."""
    CACHE.mkdir(exist_ok=True)
    scenes = plan_splits(CorpusSpec(seed=5, train_size=0, val_size=0, test_size=n))["test"]
    rng = np.random.default_rng(0)
    paths = []
    for i, scene in enumerate(scenes):
        path = CACHE / f"photo_{i:05d}.jpg"
        if not path.exists():
            import random

            img = render(scene, random.Random(i), 270).resize((1920, 1080), Image.BICUBIC)
            arr = np.asarray(img, np.int16) + rng.integers(-12, 12, (1080, 1920, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def model_alone(enc: Encoder, paths: list[Path], batch: int) -> float:
    """(a) images/s of the model on preprocessed tensors."""
    x = torch.stack([enc.preprocess_image(Image.open(p)) for p in paths])
    enc.encode_image_tensors(x[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        enc.encode_image_tensors(x[i : i + batch])
    return len(x) / (time.perf_counter() - t0)


def naive(enc: Encoder, paths: list[Path]) -> float:
    """(b) images/s of open -> preprocess -> encode, one at a time."""
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            enc.encode_image_tensors(enc.preprocess_image(img.convert("RGB"))[None])
    return len(paths) / (time.perf_counter() - t0)


def pipeline(enc: Encoder, paths: list[Path], batch: int, workers: int) -> float:
    """(c) images/s of a whole `xmodal index` run (worker start-up included)."""
    bundle = Path(tempfile.mkdtemp(prefix="xmodal-bench-bundle-"))
    try:
        t0 = time.perf_counter()
        report = run_index(
            enc,
            IndexOptions(
                bundle=bundle,
                roots=[paths[0].parent],
                batch_size=batch,
                workers=workers,
                progress=False,
            ),
        )
        seconds = time.perf_counter() - t0
        assert report.counts["indexed"] == len(paths), report.counts
        return len(paths) / seconds
    finally:
        shutil.rmtree(bundle)


def decode_alone(enc: Encoder, paths: list[Path], workers: int) -> float:
    """(d) images/s of the indexer's decode workers with no model running."""
    w, h = enc.image_size
    pool = DecodePool(workers, enc.preprocess, draft=(w, h))
    with pool:
        t0 = time.perf_counter()
        done = sum(1 for d in pool.run(Job(i, bytes(p)) for i, p in enumerate(paths)))
        seconds = time.perf_counter() - t0
    assert done == len(paths)
    return len(paths) / seconds


def main() -> None:
    """Run and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=default_threads())
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default="default,ViT-B-32")
    args = ap.parse_args()
    configure_threads(args.threads)
    paths = make_photos(args.n)
    rows = []
    for name in args.models.split(","):
        enc = Encoder.load() if name == "default" else Encoder.load(name)
        batch = 64
        a = model_alone(enc, paths[: min(len(paths), 256)], batch)
        b = naive(enc, paths[: min(len(paths), 200)])
        c = pipeline(enc, paths, batch, args.workers)
        d = decode_alone(enc, paths, args.workers)
        bound = 1 / (1 / a + 1 / d)
        rows.append(
            {
                "model": enc.identity.name,
                "model_alone_img_s": round(a, 1),
                "naive_img_s": round(b, 1),
                "xmodal_index_img_s": round(c, 1),
                "decode_alone_img_s": round(d, 1),
                "two_core_bound_img_s": round(bound, 1),
                "vs_bound": round(c / bound, 2),
                "vs_model_alone": round(c / a, 2),
                "vs_naive": round(c / b, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpu": platform.processor(),
                "images": args.n,
                "workers": args.workers,
                "threads": thread_settings(),
            }
        )
    )


if __name__ == "__main__":
    main()
