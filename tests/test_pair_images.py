"""Decoding a pairs file's images: every failure comes back as (path, reason)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from image_fixtures import scene
from xmodal.crossmodal.errors import DataError
from xmodal.crossmodal.pair_images import ImageFailure, decode_pair_images, load_pair_images
from xmodal.crossmodal.pairs import read_pairs
from xmodal.training.loop import warmup_cosine
from xmodal.training.rerank_features import image_features


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), np.float32)).permute(2, 0, 1)


def _pairs_file(folder: Path, broken: bool = True) -> Path:
    names = ["a.png", "corrupt.png", "b.png", "missing.png"] if broken else ["a.png"]
    for i, name in enumerate(names):
        if name == "corrupt.png":
            (folder / name).write_bytes(b"not a png")
        elif name != "missing.png":
            scene(i, 16).save(folder / name)
    lines = [json.dumps({"image": n, "caption": f"picture {n}"}) for n in names]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


@pytest.mark.parametrize("workers", [1, 3])
def test_failures_are_returned_with_their_reason_and_the_rest_kept_in_order(
    tmp_path: Path, workers: int
) -> None:
    pairs = read_pairs(_pairs_file(tmp_path))
    images, kept, failures = load_pair_images(pairs, _to_tensor, workers, progress=False)
    assert kept == [0, 2] and images.shape == (2, 3, 8, 8)
    assert [f.path.name for f in failures] == ["corrupt.png", "missing.png"]
    assert all(isinstance(f, ImageFailure) and f.reason for f in failures)
    assert str(failures[1]).startswith(f"{tmp_path / 'missing.png'}: ")
    streamed: list[ImageFailure] = []
    again = list(decode_pair_images(pairs.images, _to_tensor, streamed, workers, progress=False))
    assert [i for i, _ in again] == kept and streamed == failures
    torch.testing.assert_close(torch.stack([x for _, x in again]), images)


def test_no_image_at_all_raises_naming_the_failures(tmp_path: Path) -> None:
    pairs = read_pairs(_pairs_file(tmp_path))
    pairs = pairs.subset_images([1, 3])
    with pytest.raises(DataError, match=r"2 failed: .*corrupt\.png: "):
        load_pair_images(pairs, _to_tensor, progress=False)


def test_reranker_features_warn_about_images_left_out(tmp_path: Path, default_encoder) -> None:
    """They used to be dropped without a word."""
    pairs = read_pairs(_pairs_file(tmp_path))
    with pytest.warns(UserWarning, match=r"2 of 4 images left out \(2 failed: .*corrupt\.png"):
        emb, tokens, kept = image_features(default_encoder, pairs.images, batch=2)
    assert kept == [0, 2] and len(emb) == len(tokens) == 2
    (tmp_path / "clean").mkdir()
    clean = read_pairs(_pairs_file(tmp_path / "clean", broken=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_features(default_encoder, clean.images)


def test_warmup_cosine_forms() -> None:
    total, warmup = 100, 10
    clip = [warmup_cosine(s, 1.0, total, warmup) for s in range(total)]
    itm = [warmup_cosine(s, 1.0, total, warmup, decay_from_start=True) for s in range(total)]
    assert clip[0] == 0.0 and clip[warmup] == 1.0 and max(clip) == 1.0
    assert itm[0] == pytest.approx(0.1) and max(itm) < 1.0  # decay begins during warmup
    assert all(a >= b for a, b in zip(clip[warmup:], clip[warmup + 1 :], strict=False))
    assert clip[-1] < 1e-3 and itm[-1] < 1e-3
