"""The Ray engine beside the local engine: images/s of `xmodal index` on the same folder
of generated JPEGs, the same model, each into a new bundle, in one run (issue 21's bar:
Ray >= 0.7x local on 2 local CPUs).

Both engines run in this process through ``run_index``, as the command runs them. The
Ray cluster (a local one, as `--engine ray` starts: the configured CPUs, 127.0.0.1, no
dashboard) is started before the timed runs, its start-up reported apart: on a cluster
that is already up (`--ray-address auto`) a run does not pay it. What each Ray run pays
is in its figure: the pipeline's set-up, the actors' start and model load, the transfers.
The runs alternate (local, ray, local, ray, ...) so that a change in the machine's load
falls on both; the load average is recorded before and after.

Usage: .venv/bin/python bench/ray_throughput.py [--n 300] [--model xmodal-photo]
       [--size 640x480] [--repeat 2] [--threads N] [--encode-workers N] [--decode-workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: no network here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
from PIL import Image
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.threads import configure_threads, thread_settings
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.indexer.ray_cluster import start_local_ray
from xmodal.search.rerank import reranker_folder
from xmodal.training.corpus import CorpusSpec, plan_splits, render

CACHE = Path(tempfile.gettempdir()) / "xmodal-bench-ray"


def make_photos(n: int, size: tuple[int, int]) -> Path:
    """A folder of n distinct JPEGs of ``size`` (demo scenes, upscaled, with noise), cached."""
    folder = CACHE / f"set-{n}-{size[0]}x{size[1]}"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    scenes = plan_splits(CorpusSpec(seed=5, train_size=0, val_size=0, test_size=n))["test"]
    rng = np.random.default_rng(0)
    for i, scene in enumerate(scenes):
        img = render(scene, random.Random(i), 270).resize(size, Image.BICUBIC)
        arr = np.asarray(img, np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def one_run(encoder: Encoder, folder: Path, n: int, engine: str, args: argparse.Namespace) -> float:
    """images/s of one run into a new bundle (the run's wall time, model already loaded)."""
    bundle = Path(tempfile.mkdtemp(prefix=f"xmodal-bench-{engine}-")) / "bundle"
    opts = IndexOptions(
        bundle=bundle,
        roots=[folder],
        workers=args.threads,
        progress=False,
        cache_tokens=reranker_folder(encoder) is not None,
        engine=engine,
        encode_workers=args.encode_workers,
        decode_workers=args.decode_workers,
    )
    try:
        t0 = time.perf_counter()
        report = run_index(encoder, opts)
        seconds = time.perf_counter() - t0
        assert report.counts["indexed"] == n, dict(report.counts)
        return n / seconds
    finally:
        shutil.rmtree(bundle.parent)


def main() -> None:
    """Run the comparison and print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--model", default="xmodal-photo")
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each engine, alternating")
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--encode-workers", type=int, default=None)
    ap.add_argument("--decode-workers", type=int, default=None)
    args = ap.parse_args()
    args.threads = configure_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    folder = make_photos(args.n, (w, h))
    encoder = Encoder.load(args.model)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ray = start_local_ray(args.threads)
    ray_start = time.perf_counter() - t0
    rates: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        for _ in range(args.repeat):
            for engine in ("local", "ray"):
                rates[engine].append(one_run(encoder, folder, args.n, engine, args))
    finally:
        ray.shutdown()
    local, remote = statistics.median(rates["local"]), statistics.median(rates["ray"])
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": thread_settings(),
                "model": args.model,
                "images": args.n,
                "size": args.size,
                "ray_cluster_start_s": round(ray_start, 1),
                "local_img_s": [round(r, 1) for r in rates["local"]],
                "ray_img_s": [round(r, 1) for r in rates["ray"]],
                "ratio_ray_to_local": round(remote / local, 2),
                "loadavg_before": [round(v, 2) for v in load_before],
                "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
