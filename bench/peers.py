"""xmodal beside rclip and clip-retrieval: index throughput and single text-query latency
on the same folder of generated 1920x1080 JPEGs with the same ViT-B-32 weights.

The weights: ViT-B-32 with random weights (seeded; same cost as trained ones), saved once
as a safetensors file (bench/index_throughput.py's checkpoint), given to every peer:
- xmodal: `xmodal index DIR --bundle B --model ViT-B-32 --pretrained CKPT`, then
  `SearchEngine.text_to_images` in process;
- clip-retrieval: `clip_inference` (local, sequential) + `clip_index` (autofaiss), then
  clip_back's `KnnService.query` in process, the model named
  `open_clip:ViT-B-32/CKPT` (its loader takes a local file as it is);
- rclip: runs onnxruntime, not torch: the checkpoint exported to ONNX once (in its own
  venv) where rclip looks for its downloaded model; its preprocessing set to the
  checkpoint's 224 px (rclip's own model is ViT-B-32-256); `RClip.ensure_index`, then
  `RClip.search` in process.

Each peer runs in its own venv under bench/.peers/ (bench/peers_shims/venvs.py), created
on the first run and re-used; each phase is a fresh process (bench/peers_shims/*_run.py
prints one JSON line). Same settings for all: indexing on `--threads` cores (default 2,
the whole machine) with that many threads; queries pinned to `--query-threads` cores
(default 1) and threads, warmed up with 5 untimed queries, then `--queries` distinct
typed queries one at a time, k = 10. Each peer keeps its own other defaults (batch size:
xmodal 64, rclip 8; clip-retrieval 64, not its 256: see peers_shims/clip_retrieval_run.py).
Throughput is over the peer's own indexing call (model loading included for rclip and
clip-retrieval, which load lazily) and over the whole command (interpreter start-up
included); ratios are against xmodal in the same run.
HF_HUB_OFFLINE=1: nothing downloads weights.

Usage: .venv/bin/python bench/peers.py [--n 240] [--threads 2] [--query-threads 1]
       [--queries 50] [--peers xmodal,rclip,clip-retrieval] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH / "peers_shims")]

from index_throughput import make_photos, random_vit_checkpoint  # noqa: E402
from search_latency import TEXT_QUERIES  # noqa: E402
from venvs import PEERS_DIR, python_of  # noqa: E402

PEERS = ("xmodal", "rclip", "clip-retrieval")
SHIMS = BENCH / "peers_shims"
PHASE_TIMEOUT_S = 1800  # one peer's indexing of a few hundred photos on 2 cores: minutes
RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where rclip looks for its model
QUERY_SUFFIXES = ("", " at night", " in the snow")  # distinct strings: no cache answers


def query_set(n: int) -> list[str]:
    """n distinct typed queries (search_latency's, varied), the same for every peer."""
    out = [q + s for s in QUERY_SUFFIXES for q in TEXT_QUERIES]
    if n > len(out):
        raise SystemExit(f"--queries {n}: at most {len(out)} distinct queries")
    return out[:n]


def onnx_model(ckpt: Path) -> Path:
    """The checkpoint as rclip's ONNX files, exported once per checkpoint."""
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]
    out = PEERS_DIR / "onnx" / digest
    if not (out / "textual.onnx").exists():
        cmd = [str(python_of("onnx-export")), str(SHIMS / "export_onnx.py"), str(ckpt), str(out)]
        subprocess.run(cmd, check=True, capture_output=True, env=_env(), timeout=PHASE_TIMEOUT_S)
    return out


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return env


def _cores(n: int) -> set[int]:
    return set(sorted(os.sched_getaffinity(0))[:n])


def _run(cmd: list[str], cores: int, what: str) -> tuple[dict, float]:
    """A phase in a fresh process pinned to `cores` cores: its last JSON line, wall seconds."""
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=PHASE_TIMEOUT_S,
        preexec_fn=lambda: os.sched_setaffinity(0, _cores(cores)),
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"peers: {what} failed ({done.returncode}): {done.stderr[-3000:]}")
    # The last line that is a JSON object: peers print progress and logs around it.
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{") and ln.endswith("}")]
    if not lines:
        raise SystemExit(f"peers: {what} printed no result: {done.stdout[-2000:]}")
    return json.loads(lines[-1]), wall


def _shim(peer: str, phase: str, folder: Path, work: Path, ckpt: Path, threads: int) -> list[str]:
    python = sys.executable if peer == "xmodal" else str(python_of(peer))
    script = {"xmodal": "xmodal_query.py", "rclip": "rclip_run.py"}.get(
        peer, "clip_retrieval_run.py"
    )
    cmd = [python, str(SHIMS / script), "--phase", phase, "--folder", str(folder)]
    return [*cmd, "--work", str(work), "--ckpt", str(ckpt), "--threads", str(threads)]


def index_peer(peer: str, folder: Path, work: Path, ckpt: Path, threads: int) -> dict:
    """Index the folder with one peer: indexed count, seconds of its call and command."""
    if peer == "xmodal":
        xmodal = str(Path(sys.executable).with_name("xmodal"))
        cmd = [xmodal, "--threads", str(threads), "index", str(folder)]
        cmd += ["--bundle", str(work / "bundle"), "--model", "ViT-B-32", "--pretrained"]
        cmd += [str(ckpt), "--json"]
        report, wall = _run(cmd, threads, "xmodal index")
        return {"indexed": report["counts"]["indexed"], "seconds": report["seconds"], "wall": wall}
    if peer == "rclip":
        data = work / "rclip-data"
        (data / RCLIP_MODEL_SUBDIR).mkdir(parents=True)
        (data / "tokenizer").mkdir()
        onnx = onnx_model(ckpt)
        for name in ("visual.onnx", "textual.onnx"):
            (data / RCLIP_MODEL_SUBDIR / name).symlink_to(onnx / name)
        vocab = "bpe_simple_vocab_16e6.txt.gz"
        (data / "tokenizer" / vocab).symlink_to(onnx / vocab)
    result, wall = _run(_shim(peer, "index", folder, work, ckpt, threads), threads, peer)
    return {**result, "wall": wall}


def query_peer(peer: str, folder: Path, work: Path, ckpt: Path, threads: int, qfile: Path) -> dict:
    """Timed single text queries against what `index_peer` built."""
    cmd = [*_shim(peer, "query", folder, work, ckpt, threads), "--queries", str(qfile)]
    result, _ = _run(cmd, threads, f"{peer} queries")
    return result


def _p(ms: list[float], q: float) -> float:
    return round(float(np.percentile(ms, q)), 2)


def measure(peer: str, folder: Path, n: int, ckpt: Path, args, qfile: Path) -> dict:
    """One peer: index, then query; figures and the load average around them."""
    work = Path(tempfile.mkdtemp(prefix=f"xmodal-peers-{peer}-"))
    try:
        load = os.getloadavg()
        idx = index_peer(peer, folder, work, ckpt, args.threads)
        if idx["indexed"] != n:
            raise SystemExit(f"peers: {peer} indexed {idx['indexed']} of {n} images")
        q = query_peer(peer, folder, work, ckpt, args.query_threads, qfile)
        split = idx.get("encode_seconds")  # clip-retrieval: its encoding step alone
        encode = {} if split is None else {"encode_seconds": round(split, 2)}
        return {
            "peer": peer,
            "indexed": idx["indexed"],
            "index_img_s": round(n / idx["seconds"], 2),
            "index_command_img_s": round(n / idx["wall"], 2),
            "index_seconds": round(idx["seconds"], 2),
            **encode,
            "query_p50_ms": _p(q["query_ms"], 50),
            "query_p99_ms": _p(q["query_ms"], 99),
            "queries": len(q["query_ms"]),
            "first_query_top": q["first_top"],
            "loadavg_before": [round(v, 2) for v in load],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Ratios against xmodal: throughput peer/xmodal, latency peer/xmodal (>1: xmodal ahead
    on latency; <1 on throughput: xmodal ahead), and top-10 overlap on the first query."""
    base = next((r for r in rows if r["peer"] == "xmodal"), None)
    if base is None:
        return rows
    for r in rows:
        r["index_vs_xmodal"] = round(r["index_img_s"] / base["index_img_s"], 2)
        r["command_vs_xmodal"] = round(r["index_command_img_s"] / base["index_command_img_s"], 2)
        r["p50_vs_xmodal"] = round(r["query_p50_ms"] / base["query_p50_ms"], 2)
        r["p99_vs_xmodal"] = round(r["query_p99_ms"] / base["query_p99_ms"], 2)
        same = set(r["first_query_top"]) & set(base["first_query_top"])
        r["top10_overlap_with_xmodal"] = len(same)
    return rows


def table(rows: list[dict]) -> str:
    """The figures as a Markdown table (what bench/README.md shows)."""
    head = "| peer | index img/s (command) | vs xmodal | query p50 / p99 ms | p50 vs xmodal |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['peer']} | {r['index_img_s']} ({r['index_command_img_s']}) | "
            f"{r.get('index_vs_xmodal', '-')} | {r['query_p50_ms']} / {r['query_p99_ms']} | "
            f"{r.get('p50_vs_xmodal', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240, help="generated 1920x1080 JPEGs")
    ap.add_argument("--threads", type=int, default=2, help="cores and threads for indexing")
    ap.add_argument("--query-threads", type=int, default=1, help="cores and threads, queries")
    ap.add_argument("--queries", type=int, default=50, help="timed queries per peer")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)} (known: {', '.join(PEERS)})")
    for peer in peers:  # installs first, so they don't run beside a measurement
        if peer != "xmodal":
            python_of(peer)
    ckpt = random_vit_checkpoint()
    if "rclip" in peers:
        onnx_model(ckpt)
    photos = make_photos(args.n)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(query_set(args.queries), f)
    qfile = Path(f.name)
    try:
        rows = with_ratios([measure(p, photos[0].parent, args.n, ckpt, args, qfile) for p in peers])
    finally:
        qfile.unlink()
    out = {
        "bench": "peers",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "images": {"n": args.n, "size": "1920x1080 JPEG"},
        "model": "ViT-B-32, random weights (seed 0), one safetensors file for all",
        "index_threads": args.threads,
        "query_threads": args.query_threads,
        "results": rows,
    }
    print(table(rows))
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
