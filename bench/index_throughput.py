"""Indexing throughput on 1,000 generated 1920x1080 JPEGs, four ways side by side:

(a) the model alone on already-decoded, preprocessed tensors (the ceiling): one batch of
    64 on every thread, and passes of 16 on the inference streams the indexer uses (and
    of the tower's own pass size, the photo model's 4, which the indexer uses for it);
    the fastest counts,
(b) a naive loop that opens, preprocesses and encodes one image at a time,
(c) the real `xmodal index` command, run as a subprocess into a new bundle as a user
    runs it: images/s over the run's own seconds (its report: scan, decode workers,
    encoding, catalog, publication) and over the whole command (interpreter start-up and
    model load included),
(d) the decode workers alone (read, hash, decode, resize to the model's input; no model).

(a) and (d) give the machine's bound for (c): decoding and inference share the same
cores, so at best 1 / (1/a + 1/d) images/s when each alone already uses every core.

Models: the built-in photo model (the default) and shapes model; ``--vit`` adds the
ViT-B-32 architecture with random weights (same cost as trained ones; slow). The machine
may be shared: the load average is recorded before and after each model.

Usage: .venv/bin/python bench/index_throughput.py [--n 1000] [--models xmodal-photo,...]
       [--workers N] [--threads N] [--vit] [--repeat N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.threads import (
    PASS_SIZE,
    configure_threads,
    default_threads,
    inference_streams,
    thread_settings,
)
from xmodal.indexer.decode import DecodePool, Job, PixelFormat, draft_size
from xmodal.search.rerank import reranker_folder
from xmodal.training.corpus import CorpusSpec, plan_splits, render

CACHE = Path(tempfile.gettempdir()) / "xmodal-bench-1080p"
BATCH = 64  # the indexer's default batch size
MODEL_IMAGES = 256  # (a): preprocessed once, encoded in batches
NAIVE_IMAGES = {"default": 200, "ViT-B-32": 64}  # (b): bounded, it is slow


def make_photos(n: int) -> list[Path]:
    """n distinct 1920x1080 JPEGs (demo scenes, upscaled, with noise), cached across runs,
    in a folder of exactly n (hard links), which `xmodal index` gets whole."""
    CACHE.mkdir(exist_ok=True)
    scenes = plan_splits(CorpusSpec(seed=5, train_size=0, val_size=0, test_size=n))["test"]
    rng = np.random.default_rng(0)
    paths = []
    for i, scene in enumerate(scenes):
        path = CACHE / f"photo_{i:05d}.jpg"
        if not path.exists():
            img = render(scene, random.Random(i), 270).resize((1920, 1080), Image.BICUBIC)
            arr = np.asarray(img, np.int16) + rng.integers(-12, 12, (1080, 1920, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    folder = CACHE / f"set-{n}"
    folder.mkdir(exist_ok=True)
    linked = []
    for path in paths:
        if not (folder / path.name).exists():
            os.link(path, folder / path.name)
        linked.append(folder / path.name)
    return linked


def _encode_fn(enc: Encoder, tokens: bool):
    """What the indexer computes per image: token features too when it caches them."""
    if tokens:
        return lambda x: enc.image_tokens(x)
    return lambda x: enc.encode_image_spaces(x)


def model_alone(enc: Encoder, paths: list[Path], tokens: bool) -> dict[str, float]:
    """(a) images/s of the model on preprocessed tensors: one batch on every thread, and
    passes on the inference streams."""
    x = torch.stack([enc.preprocess_image(Image.open(p)) for p in paths])
    fn = _encode_fn(enc, tokens)
    fn(x[:BATCH])
    t0 = time.perf_counter()
    for i in range(0, len(x), BATCH):
        fn(x[i : i + BATCH])
    batch = len(x) / (time.perf_counter() - t0)
    out = {"batch": batch}
    # Passes of PASS_SIZE, and of the tower's own pass size where it declares one (the
    # indexer's): the baseline and the choice, side by side in one run.
    sizes = {"streams": PASS_SIZE}
    if enc.pass_size != PASS_SIZE:
        sizes["streams_model"] = enc.pass_size
    for key, size in sizes.items():
        with inference_streams() as streams:
            streams.submit(lambda part: (fn(part)[0],), x[:BATCH], size).result()  # warm-up
            t0 = time.perf_counter()
            for i in range(0, len(x), BATCH):
                streams.submit(lambda part: (fn(part)[0],), x[i : i + BATCH], size).result()
            out[key] = len(x) / (time.perf_counter() - t0)
    return out


def naive(enc: Encoder, paths: list[Path]) -> float:
    """(b) images/s of open -> preprocess -> encode, one at a time."""
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            enc.encode_image_tensors(enc.preprocess_image(img.convert("RGB"))[None])
    return len(paths) / (time.perf_counter() - t0)


def cli_index(model: list[str], folder: Path, n: int, workers: int, threads: int | None) -> dict:
    """(c) `xmodal index FOLDER --bundle NEW` as a subprocess; images/s of the run (its
    report's seconds) and of the whole command."""
    bundle = Path(tempfile.mkdtemp(prefix="xmodal-bench-bundle-")) / "bundle"
    xmodal = Path(sys.executable).with_name("xmodal")
    cmd = [str(xmodal)] + (["--threads", str(threads)] if threads else [])
    cmd += ["index", str(folder), "--bundle", str(bundle), *model]
    cmd += ["--workers", str(workers), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["counts"]["indexed"] == n, report["counts"]
        return {"run": n / report["seconds"], "command": n / wall, "seconds": report["seconds"]}
    finally:
        shutil.rmtree(bundle.parent)


def decode_alone(enc: Encoder, paths: list[Path], workers: int) -> float:
    """(d) images/s of the indexer's decode workers with no model running."""
    fmt = PixelFormat.from_preprocess(enc.preprocess)
    pool = DecodePool(workers, fmt or enc.preprocess, draft=draft_size(enc.image_size))
    with pool:
        list(pool.run([Job(-1, bytes(paths[0]))]))  # workers started and warm
        t0 = time.perf_counter()
        done = sum(1 for d in pool.run(Job(i, bytes(p)) for i, p in enumerate(paths)))
        seconds = time.perf_counter() - t0
    assert done == len(paths)
    return len(paths) / seconds


def random_vit_checkpoint() -> Path:
    """ViT-B-32 with random weights saved to a file, so the CLI can load it (it refuses a
    bare architecture name)."""
    import open_clip
    from safetensors.torch import save_file

    path = Path(tempfile.gettempdir()) / "xmodal-bench-vit-b-32-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _median(values: list[float]) -> float:
    return float(np.median(values))


def measure(name: str, paths: list[Path], workers: int, threads: int | None, repeat: int) -> dict:
    """One model, (a) to (d), with the ratios. With ``repeat`` > 1, (a), (c) and (d) run
    that many rounds in turn and each ratio to the bound is taken within its own round
    (a shared machine drifts between rounds); the medians are reported, the rounds too."""
    if name == "ViT-B-32":
        ckpt = random_vit_checkpoint()
        enc, model = Encoder.load(name, str(ckpt)), ["--model", name, "--pretrained", str(ckpt)]
    else:
        enc, model = Encoder.load(name), ["--model", name]
    tokens = reranker_folder(enc) is not None  # `xmodal index` caches them then
    load_before = os.getloadavg()
    b = naive(enc, paths[: NAIVE_IMAGES.get(name, NAIVE_IMAGES["default"])])
    rounds = []
    for _ in range(repeat):
        a = model_alone(enc, paths[:MODEL_IMAGES], tokens)
        c = cli_index(model, paths[0].parent, len(paths), workers, threads)
        d = decode_alone(enc, paths, workers)
        best = max(a.values())
        bound = 1 / (1 / best + 1 / d)
        rounds.append({"a": a, "best": best, "c": c, "d": d, "bound": bound})
    med = {
        "best": _median([r["best"] for r in rounds]),
        "run": _median([r["c"]["run"] for r in rounds]),
        "command": _median([r["c"]["command"] for r in rounds]),
        "d": _median([r["d"] for r in rounds]),
        "bound": _median([r["bound"] for r in rounds]),
        "vs_bound": _median([r["c"]["run"] / r["bound"] for r in rounds]),
        "command_vs_bound": _median([r["c"]["command"] / r["bound"] for r in rounds]),
    }
    passes = {f"model_alone_streams_pass{PASS_SIZE}_img_s": "streams"}
    if enc.pass_size != PASS_SIZE:
        passes[f"model_alone_streams_pass{enc.pass_size}_img_s"] = "streams_model"
    return {
        "model": enc.identity.name,
        "token_features": tokens,
        "rounds": repeat,
        "model_alone_img_s": round(med["best"], 1),
        "model_alone_batch64_img_s": round(_median([r["a"]["batch"] for r in rounds]), 1),
        **{k: round(_median([r["a"][v] for r in rounds]), 1) for k, v in passes.items()},
        "index_pass_size": enc.pass_size,
        "naive_img_s": round(b, 1),
        "xmodal_index_img_s": round(med["run"], 1),
        "xmodal_index_command_img_s": round(med["command"], 1),
        "xmodal_index_run_s": [r["c"]["seconds"] for r in rounds],
        "decode_alone_img_s": round(med["d"], 1),
        "two_core_bound_img_s": round(med["bound"], 1),
        "vs_bound": round(med["vs_bound"], 2),
        "vs_bound_rounds": [round(r["c"]["run"] / r["bound"], 2) for r in rounds],
        "command_vs_bound": round(med["command_vs_bound"], 2),
        "vs_naive": round(med["run"] / b, 2),
        "vs_model_alone": round(med["run"] / med["best"], 2),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }


def main() -> None:
    """Run and print the comparison, one JSON line per model, then the machine's."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images for (c) and (d)")
    ap.add_argument("--workers", type=int, default=default_threads())
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default="xmodal-photo,xmodal-shapes")
    ap.add_argument("--vit", action="store_true", help="add ViT-B-32, random weights (slow)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (a), (c), (d); medians")
    args = ap.parse_args()
    configure_threads(args.threads)
    paths = make_photos(args.n)
    names = [m for m in args.models.split(",") if m] + (["ViT-B-32"] if args.vit else [])
    for name in names:
        print(json.dumps(measure(name, paths, args.workers, args.threads, args.repeat)), flush=True)
    print(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": platform.platform(),
                "cpu": platform.processor(),
                "torch": torch.__version__,
                "images": args.n,
                "workers": args.workers,
                "pass_size": PASS_SIZE,
                "batch_size": BATCH,
                "threads": thread_settings(),
                "loadavg": [round(v, 2) for v in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
