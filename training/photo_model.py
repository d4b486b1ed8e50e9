"""``xmodal build-photo-model``: the built-in photo model's folder, from its class file.

Nothing here is trained. The folder holds the open_clip config (EfficientNet-Lite0 from
its pinned package + the frozen MiniLM text tower, see ``crossmodal.photo``), the class
file (ImageNet's 1,000 classes: a name and a WordNet definition each) and one weights
file: each class's text embedding and their mean, made by the model's own text tower so
that queries and classes share one space. A class's embedding is the mean of its
prompts: the name in a few templates, the bare name, and the name with its definition
(which names the class's kind: "tabby cat: a cat with a grey or tawny coat...", so
"a cat" finds a tabby). Same class file, same packages: same bytes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import XmodalError
from xmodal.crossmodal.loading import CONFIG_FILE, WEIGHTS_FILE, load_model
from xmodal.crossmodal.photo import NUM_CLASSES
from xmodal.crossmodal.registry import BUILTIN_MODELS, LOCAL_DIR

MODEL_NAME = "xmodal-photo"
CLASSES_FILE = "imagenet_classes.tsv"
# Measured on the real-photo set's validation captions (the folder's README): the
# templates, the bare name and the definition each helped; WordNet synonyms did not.
TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a picture of a {}.",
    "{}",
)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384  # MiniLM's width: the text tower is used as it is, without projection


class PhotoModelError(XmodalError):
    """The photo model's class file is missing or malformed."""


@dataclass(frozen=True)
class ImageNetClass:
    """One row of the class file."""

    index: int
    wnid: str
    name: str
    definition: str


def config() -> dict:
    """The folder's ``open_clip_config.json``."""
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {
                "image_size": 224,
                "timm_model_name": "xmodal_conse_lite0",
                "timm_pool": "avg",
                "timm_proj": "",
            },
            "text_cfg": {
                "hf_model_name": MINILM,
                "hf_tokenizer_name": MINILM,
                "hf_pooler_type": "mean_pooler",
                "hf_proj_type": None,  # MiniLM's own sentence space: no projection
                "context_length": 128,
            },
        },
        # EfficientNet-Lite's own input statistics ([-1, 1]); bicubic, as it was trained.
        "preprocess_cfg": {
            "size": [224, 224],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
        "xmodal": {
            "name": MODEL_NAME,
            "pretrained_image": True,  # EfficientNet-Lite0's ImageNet weights, packaged
            # Both towers come from their own pinned, verified packages.
            "omitted_prefixes": ["text.transformer.", "visual.trunk.backbone."],
        },
    }


def read_classes(path: Path) -> list[ImageNetClass]:
    """The class file: a header, then ``index, wnid, name, definition`` per line (TSV)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PhotoModelError(f"cannot read class file {path}: {exc}") from exc
    classes = []
    for n, row in enumerate(rows):
        try:
            item = ImageNetClass(int(row["index"]), row["wnid"], row["name"], row["definition"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PhotoModelError(f"{path}:{n + 2}: malformed row ({exc})") from exc
        if item.index != n or not item.name:
            raise PhotoModelError(f"{path}:{n + 2}: expected class {n} with a name")
        classes.append(item)
    if len(classes) != NUM_CLASSES:
        raise PhotoModelError(f"{path} lists {len(classes)} classes, not {NUM_CLASSES}")
    return classes


def class_prompts(c: ImageNetClass) -> list[str]:
    """The texts whose mean embedding stands for one class."""
    prompts = [t.format(c.name) for t in TEMPLATES]
    if c.definition:
        prompts.append(f"a {c.name}: {c.definition}")
    return prompts


def class_embeddings(
    embed: Callable[[Sequence[str]], np.ndarray], classes: list[ImageNetClass]
) -> np.ndarray:
    """[1000, D] unit class embeddings: the normalised mean of each class's prompts."""
    prompts = [class_prompts(c) for c in classes]
    flat = [p for group in prompts for p in group]
    vectors = embed(flat)  # [sum(prompts), D], unit rows
    out, start = [], 0
    for group in prompts:
        mean = vectors[start : start + len(group)].mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
        start += len(group)
    return np.stack(out).astype(np.float32)


def build_photo_model(out: Path, classes_file: Path | None = None) -> Path:
    """Write the photo model's folder to ``out`` (config, class file, weights); returns it.

    ``classes_file`` defaults to the built-in model's own.
    """
    classes_file = classes_file or BUILTIN_MODELS[MODEL_NAME] / CLASSES_FILE
    classes = read_classes(classes_file)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config(), indent=2) + "\n", encoding="utf-8")
    if classes_file.resolve() != (out / CLASSES_FILE).resolve():
        (out / CLASSES_FILE).write_bytes(classes_file.read_bytes())
    weights = out / WEIGHTS_FILE
    # The text tower is the model's own: load the folder with empty class embeddings first.
    tmp = weights.with_suffix(".tmp")
    state = {
        "visual.trunk.class_embeddings": torch.zeros(NUM_CLASSES, EMBED_DIM),
        "visual.trunk.center": torch.zeros(EMBED_DIM),
        "logit_scale": torch.tensor(np.log(100.0), dtype=torch.float32),
    }
    save_file(state, str(weights))
    try:
        encoder = Encoder(load_model(f"{LOCAL_DIR}{out}"))
        bank = class_embeddings(encoder.encode_texts, classes)
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
    state["visual.trunk.class_embeddings"] = torch.from_numpy(bank)
    state["visual.trunk.center"] = torch.from_numpy(bank.mean(axis=0))
    save_file(state, str(tmp))
    tmp.replace(weights)
    return out
