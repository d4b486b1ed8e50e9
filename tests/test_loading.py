"""Loading any open_clip model by tag, file or local-dir, and the errors when it can't."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import (
    CheckpointError,
    ConfigMismatchError,
    PretrainedUnavailableError,
    UnknownModelError,
    WeightsIntegrityError,
)
from xmodal.crossmodal.loading import load_model
from xmodal.crossmodal.registry import (
    PACKAGED_TEXT_TOWERS,
    PackagedTextTower,
    packaged_tower_path,
    sha256_file,
)

TINY = "xmodal-tiny"
IMAGES = [Image.new("RGB", (40, 30), c) for c in ("red", "navy", "white")]
TEXTS = ["a red square", "a navy circle on white", "nothing at all"]


def test_file_and_local_dir_load_the_same_weights(tiny_checkpoint: Path, tiny_local_dir: Path):
    by_file = Encoder.load(TINY, str(tiny_checkpoint))
    by_dir = Encoder.load(f"local-dir:{tiny_local_dir}")
    by_dir_as_pretrained = Encoder.load(TINY, f"local-dir:{tiny_local_dir}")
    for enc in (by_dir, by_dir_as_pretrained):
        np.testing.assert_allclose(enc.encode_texts(TEXTS), by_file.encode_texts(TEXTS), atol=1e-6)
        np.testing.assert_allclose(
            enc.encode_images(IMAGES), by_file.encode_images(IMAGES), atol=1e-6
        )
    assert by_file.identity.sha256 == sha256_file(tiny_checkpoint)
    assert by_file.identity.name == by_dir.identity.name == TINY
    assert by_file.identity.embed_dim == 32
    # Different weights files of the same bytes are the same model; random weights are not.
    assert by_dir.identity.sha256 == sha256_file(tiny_local_dir / "open_clip_model.safetensors")
    random = Encoder.load(TINY)
    assert random.identity.sha256 is None and not random.identity.matches(by_file.identity)


def _fake_hub_snapshot(cache: Path, repo: str, filename: str, tensors: dict) -> Path:
    """Lay out a Hugging Face hub cache entry, as a download would have left it."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    save_file(tensors, str(snap / filename))
    return snap / filename


def test_pretrained_tag_resolves_through_open_clips_download_path(hf_hub_cache: Path) -> None:
    """The online path (ViT-B-32 / laion2b_s34b_b79k) with the hub cache pre-filled:
    open_clip's own download code finds the file, exactly as after a real download."""
    import open_clip

    torch.manual_seed(0)
    state = open_clip.create_model("ViT-B-32").state_dict()
    weights = _fake_hub_snapshot(
        hf_hub_cache,
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "open_clip_model.safetensors",
        {k: v.half().contiguous() for k, v in state.items()},
    )
    by_tag = Encoder.load("ViT-B-32", "laion2b_s34b_b79k")
    assert by_tag.identity.sha256 == sha256_file(weights)
    assert by_tag.identity.pretrained == "laion2b_s34b_b79k"
    assert by_tag.dim == 512 and by_tag.image_size == (224, 224)
    by_file = Encoder.load("ViT-B-32", str(weights))
    assert by_file.identity.matches(by_tag.identity)
    np.testing.assert_allclose(
        by_tag.encode_texts(TEXTS[:1]), by_file.encode_texts(TEXTS[:1]), atol=1e-5
    )


def test_tag_without_network_says_what_to_do_instead() -> None:
    with pytest.raises(PretrainedUnavailableError, match=r"needs a network.*checkpoint file"):
        load_model("ViT-B-32", "datacomp_xl_s13b_b90k")  # not in the cache, offline


def test_unknown_model_name_suggests_close_ones() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model 'ViT-B-32x'.*ViT-B-32"):
        load_model("ViT-B-32x", "whatever.pt")


def test_unknown_tag_lists_the_known_ones() -> None:
    with pytest.raises(PretrainedUnavailableError, match=r"laion2b_s34b_b79k"):
        load_model("ViT-B-32", "laion9000")


@pytest.mark.parametrize(
    ("content", "suffix"),
    [
        (b"", ".safetensors"),
        (b"this is not a checkpoint" * 50, ".safetensors"),
        (b"PK\x03\x04 truncated zip", ".pt"),
        (b"\x80\x04garbage-pickle", ".bin"),
    ],
)
def test_corrupt_checkpoint_is_named(tmp_path: Path, content: bytes, suffix: str) -> None:
    bad = tmp_path / f"weights{suffix}"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(bad)):
        load_model(TINY, str(bad))


def test_truncated_safetensors_is_named(tmp_path: Path, tiny_checkpoint: Path) -> None:
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_checkpoint.read_bytes()[:-500])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_model(TINY, str(bad))


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(TINY, str(tmp_path / "nope" / "weights.pt"))
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_model(f"local-dir:{tmp_path / 'nope'}")


def test_weights_that_do_not_fit_the_config(tiny_checkpoint: Path) -> None:
    with pytest.raises(ConfigMismatchError, match=r"does not fit.*(size mismatch|missing)"):
        load_model("xmodal-minilm-vit", str(tiny_checkpoint))


def test_local_dir_without_config(tmp_path: Path, tiny_checkpoint: Path) -> None:
    shutil.copy(tiny_checkpoint, tmp_path / "open_clip_model.safetensors")
    with pytest.raises(CheckpointError, match=r"open_clip_config\.json"):
        load_model(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot parse"):
        load_model(f"local-dir:{tmp_path}")


def test_packaged_text_tower_is_verified(tmp_path: Path, monkeypatch) -> None:
    real = PACKAGED_TEXT_TOWERS["sentence-transformers/all-MiniLM-L6-v2"]
    assert packaged_tower_path(real).joinpath("model.safetensors").is_file()
    # A package whose weights differ by one byte is refused, naming the file.
    folder = tmp_path / "model"
    folder.mkdir()
    blob = bytearray(b"\x00" * 1024)
    (folder / "model.safetensors").write_bytes(bytes(blob))
    pkg = tmp_path / "fake_tower_pkg.py"
    pkg.write_text(f"def get_model_path():\n    return {str(folder)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tampered = PackagedTextTower(real.hub_id, "fake_tower_pkg", "model.safetensors", real.sha256)
    with pytest.raises(
        WeightsIntegrityError, match=r"refusing text tower weights .*model.safetensors"
    ):
        packaged_tower_path(tampered)
    sys.modules.pop("fake_tower_pkg", None)


def test_registered_config_builds_and_leaves_no_temporary_folder(monkeypatch, tmp_path) -> None:
    # A killed server must not leave a folder per process in /tmp: the config file
    # open_clip reads is gone as soon as it is registered.
    import open_clip
    from xmodal.crossmodal.registry import register_config, shipped_configs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = shipped_configs()[TINY]
    cfg["embed_dim"] = 48  # a config no other test registered
    register_config("xmodal-tiny-registry-test", cfg)
    assert list(tmp_path.iterdir()) == []
    model = open_clip.create_model("xmodal-tiny-registry-test")
    assert model.visual.output_dim == 48
