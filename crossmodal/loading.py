"""Create an open_clip model from a name plus a pretrained value, with errors a person can act on.

The pretrained value is one of:

* a tag open_clip knows for that name (``laion2b_s34b_b79k``): downloaded by open_clip
  where a network exists;
* a local checkpoint file (``.pt``, ``.bin``, ``.safetensors``);
* ``local-dir:/path``: a folder with ``open_clip_config.json`` and a weights file, as
  ``xmodal train`` writes it and open_clip's hub format lays it out;
* nothing: random weights (useful for timing only).

With neither a name nor a pretrained value, the built-in default (the photo model) is loaded.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import (
    CheckpointError,
    ConfigMismatchError,
    ModelError,
    PretrainedUnavailableError,
    UnknownModelError,
)
from .registry import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    DEFAULT_MODEL_DIR,
    LOCAL_DIR,
    model_config,
    register_config,
    register_shipped,
    sha256_file,
)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# Checkpoint names open_clip looks for in a folder, in its order of preference.
_WEIGHTS_NAMES = (
    WEIGHTS_FILE,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "model.pth",
)


@dataclass(frozen=True)
class ModelIdentity:
    """What a bundle records about the model that built it."""

    name: str  # open_clip config name
    pretrained: str | None  # tag, checkpoint path or local-dir:path, as given
    sha256: str | None  # of the weights file; None for random weights
    embed_dim: int
    # Size of the image tower's own feature space (image -> similar images), for models
    # that have one besides the joint space (the photo model); None for the rest.
    visual_dim: int | None = None

    def matches(self, other: ModelIdentity) -> bool:
        """Same model: same architecture name, same weights bytes, same embedding sizes.

        Paths are left out: the same weights may live in different folders.
        """
        return (self.name, self.sha256, self.embed_dim, self.visual_dim) == (
            other.name,
            other.sha256,
            other.embed_dim,
            other.visual_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``visual_dim`` only where the model has that space)."""
        data = asdict(self)
        if self.visual_dim is None:
            del data["visual_dim"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        """Inverse of ``to_dict``."""
        return cls(
            name=str(data["name"]),
            pretrained=data.get("pretrained"),
            sha256=data.get("sha256"),
            embed_dim=int(data["embed_dim"]),
            visual_dim=int(data["visual_dim"]) if data.get("visual_dim") is not None else None,
        )


@dataclass
class LoadedModel:
    """An open_clip model in eval mode with everything needed to use it."""

    model: torch.nn.Module
    preprocess: Callable  # PIL image -> [3, H, W] float tensor
    tokenizer: Callable  # list[str] -> [B, L] token ids
    identity: ModelIdentity
    model_cfg: dict[str, Any]
    weights_path: Path | None


@contextlib.contextmanager
def quiet_model_build() -> Iterator[None]:
    """Silence open_clip's and transformers' chatter while a model is built.

    open_clip logs 'initialized randomly/partially' before we load our own weights,
    and transformers prints a load report for the frozen text tower: both misleading.
    """
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def default_model_dir() -> Path:
    """The folder of the built-in default model."""
    return DEFAULT_MODEL_DIR


def _known_names() -> list[str]:
    import open_clip

    return open_clip.list_models()


def ensure_known_model(name: str) -> None:
    """Make sure open_clip can build the model config ``name``.

    One of xmodal's shipped configs is registered with open_clip on first use; a name
    open_clip does not know either raises UnknownModelError naming close matches.
    """
    import open_clip

    if register_shipped(name) or name in open_clip.list_models():
        return
    close = difflib.get_close_matches(name, _known_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: not an open_clip model config nor one of xmodal's{hint} "
        f"(`python -c 'import open_clip; print(open_clip.list_models())'` lists them)"
    )


def read_state_dict_into(
    model: torch.nn.Module, path: Path, allow_missing: tuple[str, ...] = ()
) -> None:
    """Load a checkpoint file into ``model``, translating failures into our errors.

    ``allow_missing`` lists key prefixes that may be absent from the file (a frozen
    pretrained tower that was already loaded from its own files).
    """
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    try:
        state = open_clip.factory.load_state_dict(str(path))
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise TypeError("no tensors by name in it")
    except Exception as exc:  # torch, safetensors and pickle raise many unrelated types
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt or not an open_clip weights file ({first})"
        ) from exc
    cause: Exception | None = None
    try:
        # open_clip's loader reads the file again but also converts older layouts
        # (position ids, logit_scale shape, resized position embeddings).
        result = open_clip.load_checkpoint(model, str(path), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(allow_missing)]
        misfit = bool(missing or result.unexpected_keys)
    except Exception as exc:  # the file reads fine, so the failure is a misfit
        misfit, cause = True, exc
    if misfit:
        raise ConfigMismatchError(
            f"checkpoint {path} does not fit the model config: "
            + _describe_misfit(model.state_dict(), state, allow_missing)
        ) from cause


def _describe_misfit(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], allow_missing: tuple
) -> str:
    missing = [k for k in expected if k not in found and not k.startswith(allow_missing)]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} is {tuple(found[k].shape)}, config wants {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} size mismatches (e.g. {'; '.join(shapes[:2])})")
    if missing:
        parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    return "; ".join(parts) or "incompatible layout"


def _finish(
    model: torch.nn.Module,
    preprocess: Callable,
    name: str,
    pretrained: str | None,
    weights: Path | None,
    model_cfg: dict[str, Any],
) -> LoadedModel:
    import open_clip

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    identity = ModelIdentity(
        name=name,
        pretrained=pretrained,
        sha256=sha256_file(weights) if weights else None,
        embed_dim=int(model_cfg["embed_dim"]),
        visual_dim=visual_space_dim(model),
    )
    return LoadedModel(model, preprocess, tokenizer, identity, model_cfg, weights)


def visual_space_dim(model: torch.nn.Module) -> int | None:
    """The size of the image tower's own feature space, where it declares one."""
    dim = getattr(getattr(getattr(model, "visual", None), "trunk", None), "visual_dim", None)
    return int(dim) if dim else None


def _find_weights(folder: Path) -> Path | None:
    for candidate in _WEIGHTS_NAMES:
        if (folder / candidate).is_file():
            return folder / candidate
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pt"))
    return found[0] if found else None


def read_local_dir_config(folder: Path) -> dict[str, Any]:
    """Parse a local-dir folder's ``open_clip_config.json``."""
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if not cfg_path.is_file():
        raise CheckpointError(f"model folder {folder} has no {CONFIG_FILE}")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot parse {cfg_path}: {exc}") from exc
    if not isinstance(data, dict) or "model_cfg" not in data:
        raise CheckpointError(f"{cfg_path} has no 'model_cfg' (open_clip's local-dir format)")
    return data


def _load_local_dir(folder: Path, pretrained_value: str) -> LoadedModel:
    import open_clip

    data = read_local_dir_config(folder)
    model_cfg = data["model_cfg"]
    meta = data.get("xmodal", {})
    name = meta.get("name") or folder.name
    weights = _find_weights(folder)
    if weights is None:
        raise CheckpointError(f"model folder {folder} holds no weights file ({WEIGHTS_FILE})")
    register_config(name, model_cfg)
    pre = data.get("preprocess_cfg", {})
    # Towers the checkpoint leaves out because they are frozen pretrained weights that
    # come from their own verified files (e.g. the MiniLM text tower).
    omitted = tuple(meta.get("omitted_prefixes", ()))
    with quiet_model_build():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=None,
            image_mean=pre.get("mean"),
            image_std=pre.get("std"),
            image_interpolation=pre.get("interpolation"),
            image_resize_mode=pre.get("resize_mode"),
            # An image tower whose pretrained weights come from a pinned package
            # (the photo model's): open_clip's flag for "build it with its own weights".
            pretrained_image=bool(meta.get("pretrained_image", False)),
        )
    read_state_dict_into(model, weights, allow_missing=omitted)
    return _finish(model, preprocess, name, pretrained_value, weights, model_cfg)


def _load_named(name: str, pretrained: str | None) -> LoadedModel:
    import open_clip

    ensure_known_model(name)
    model_cfg = model_config(name)
    if pretrained is None:
        with quiet_model_build():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        return _finish(model, preprocess, name, None, None, model_cfg)
    if os.path.isfile(pretrained):
        with quiet_model_build():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        read_state_dict_into(model, Path(pretrained))
        return _finish(model, preprocess, name, pretrained, Path(pretrained), model_cfg)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if any(ch in pretrained for ch in "/\\") or pretrained.endswith((".pt", ".bin", ".pth")):
            raise CheckpointError(f"checkpoint file not found: {pretrained}")
        raise PretrainedUnavailableError(
            f"{pretrained!r} is neither a pretrained tag of {name} nor a file; "
            f"known tags: {', '.join(tags) if tags else 'none'}"
        )
    try:
        weights = Path(open_clip.download_pretrained(tag_cfg))
    except Exception as exc:
        raise PretrainedUnavailableError(
            f"could not get weights for {name} / {pretrained} ({type(exc).__name__}): "
            "open_clip downloads them from the Hugging Face hub, which needs a network. "
            "Offline, pass a checkpoint file (--pretrained /path/open_clip_model.safetensors) "
            f"or a {LOCAL_DIR}/path folder."
        ) from exc
    with quiet_model_build():
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return _finish(model, preprocess, name, pretrained, weights, model_cfg)


def load_model(name: str | None = None, pretrained: str | None = None) -> LoadedModel:
    """Load a model on the CPU, in eval mode, gradients off.

    ``name`` is a built-in model (``xmodal-photo``, ``xmodal-shapes``), an open_clip config
    name or ``local-dir:/path``; ``pretrained`` a tag, a checkpoint file or
    ``local-dir:/path``. Both None loads the built-in default (the photo model).
    """
    if name is None and pretrained is None:
        name = DEFAULT_MODEL
    if name in BUILTIN_MODELS and pretrained is None:
        folder = BUILTIN_MODELS[name]
        if not (folder / CONFIG_FILE).is_file():
            raise ModelError(
                f"the built-in model {name} is missing from {folder}; "
                f"reproduce it with the command in data/models/{name}/README.md"
            )
        return _load_local_dir(folder, f"{LOCAL_DIR}{folder}")
    for value in (name, pretrained):
        if value and value.startswith(LOCAL_DIR):
            folder = Path(value[len(LOCAL_DIR) :]).expanduser()
            return _load_local_dir(folder, value)
    if name is None:
        raise UnknownModelError("a pretrained value needs a model name (--model)")
    return _load_named(name, pretrained)
