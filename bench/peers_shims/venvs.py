"""One virtual environment per peer for bench/peers.py, created once and re-used.

Each peer gets its own venv under ``bench/.peers/`` (git-ignored) so its pinned
requirements (clip-retrieval wants numpy<2 and open_clip<3; rclip numpy 2.1 and
onnxruntime) never meet xmodal's. torch is the exception: copying torch 2.14.1 and its
CUDA libraries (5.5 GB) into every venv takes longer than the benchmark, so a venv that
needs torch sees the running interpreter's own torch, torchvision and triton through a
``.pth`` file over a folder of symlinks (``torch-site``). pip then finds torch==2.14.1
installed and resolves the peer's other requirements around it; nothing else of
xmodal's environment is visible to the peer.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parents[1] / ".peers"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
# Distributions shared with the peers through torch-site (top-level names in site-packages).
TORCH_FAMILY = ("torch", "torchgen", "functorch", "torchvision", "triton", "nvidia")
INSTALL_TIMEOUT_S = 3600

# Requirements per venv: pinned releases this benchmark was run with (Python 3.11).
PEER_REQUIREMENTS: dict[str, tuple[list[str], bool]] = {
    # name: (pip requirements, sees torch through torch-site)
    "rclip": (["rclip==3.3.0"], False),
    # clip-retrieval 2.45.0's own bounds pick numpy 1.26 / pyarrow 15 / open_clip 2.x.
    # clip-anytorch (an all_clip requirement) imports pkg_resources: setuptools < 81 has it.
    "clip-retrieval": (["clip-retrieval==2.45.0", "setuptools<81", *TORCH_PINS], True),
    # Exports the shared checkpoint to the ONNX files rclip runs (rclip itself has no torch).
    "onnx-export": (["open_clip_torch==3.3.0", "onnx==1.23.2", *TORCH_PINS], True),
}


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def torch_site() -> Path:
    """A folder of symlinks to this interpreter's torch family (packages and dist-info)."""
    src = Path(sysconfig.get_paths()["purelib"])
    site = PEERS_DIR / "torch-site"
    site.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        name = entry.name.split("-")[0].split(".")[0]
        family = name in TORCH_FAMILY or name.startswith("nvidia_")
        if family and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    return site


def python_of(name: str) -> Path:
    """The interpreter of a peer's venv, created and installed on first use."""
    reqs, with_torch = PEER_REQUIREMENTS[name]
    venv = PEERS_DIR / name
    python = venv / "bin" / "python"
    stamp = hashlib.sha256(json.dumps([reqs, with_torch]).encode()).hexdigest()[:16]
    marker = venv / ".xmodal-bench-ready"
    if marker.exists() and marker.read_text() == stamp:
        return python
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    print(f"peers: installing {name} into {venv} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    if with_torch:
        (_site_packages(python) / "_xmodal_bench_torch.pth").write_text(f"{torch_site()}\n")
    cmd = [str(python), "-m", "pip", "install", *reqs]
    log = venv / "pip.log"
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:]
        raise SystemExit(f"peers: pip could not install {' '.join(reqs)} for {name}: {tail}")
    marker.write_text(stamp)
    return python


if __name__ == "__main__":
    for peer in sys.argv[1:] or list(PEER_REQUIREMENTS):
        print(python_of(peer))
