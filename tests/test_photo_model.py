"""The built-in photo model on real photos: it loads offline from its pinned packages and
refuses changed weights, embeds deterministically, finds a cat for "a cat", is what
`xmodal index` uses by default, and its two-space bundle (joint + visual FAISS indexes)
round-trips through verify, incremental re-indexing and search."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_fixtures import scene
from PIL import Image, ImageEnhance, ImageOps
from safetensors.torch import load_file
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.photo import LITE0, backbone_weights_path
from xmodal.crossmodal.registry import BUILTIN_MODELS, DEFAULT_MODEL
from xmodal.indexer.options import IndexOptions
from xmodal.indexer.pipeline import run_index
from xmodal.indexer.verify import verify_bundle
from xmodal.search.engine import ModelMismatchError, SearchEngine
from xmodal.training.photo_set import build_photo_set, load_spec

PHOTO_DIR = BUILTIN_MODELS[DEFAULT_MODEL]


@pytest.fixture(scope="module")
def photo_encoder() -> Encoder:
    return Encoder.load(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 21 real photos of the photo set, one file each."""
    out = tmp_path_factory.mktemp("photo-set")
    build_photo_set(out)
    return out / "images"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmodal", "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def test_photo_model_is_the_default_and_embeds_deterministically(
    photo_encoder: Encoder, photos: Path
) -> None:
    assert DEFAULT_MODEL == "xmodal-photo"
    ident = photo_encoder.identity
    assert (ident.name, ident.embed_dim, ident.visual_dim) == ("xmodal-photo", 384, 1280)
    cat = _open(photos / "chelsea.png")
    x = photo_encoder.preprocess_image(cat)[None]
    joint, visual = photo_encoder.encode_image_spaces(torch.cat([x, x]))
    again, visual_again = photo_encoder.encode_image_spaces(x)
    assert joint.shape == (2, 384) and visual.shape == (2, 1280)
    np.testing.assert_allclose(np.linalg.norm(joint, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(visual, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(joint[0], again[0], atol=1e-6)
    np.testing.assert_allclose(visual[1], visual_again[0], atol=1e-6)
    np.testing.assert_allclose(photo_encoder.encode_images([cat])[0], joint[0], atol=1e-6)
    text = photo_encoder.encode_texts(["a cat", "a cat"])
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(text[0], text[1])


def _assert_ranked_first(encoder: Encoder, folder: Path, queries: dict[str, str]) -> None:
    """Each query's top photo in ``folder`` is the one named (its id, the file's stem)."""
    names = sorted(p.name for p in folder.iterdir())
    images = encoder.encode_images([_open(folder / n) for n in names])
    scores = encoder.encode_texts(list(queries)) @ images.T
    for (query, want), row in zip(queries.items(), scores, strict=True):
        assert names[int(np.argmax(row))].split(".")[0] == want, query


def test_a_cat_photo_ranks_first_for_a_cat(photo_encoder: Encoder, photos: Path) -> None:
    _assert_ranked_first(photo_encoder, photos, {"a cat": "chelsea", "a cup of coffee": "coffee"})


def test_a_dog_and_an_insect_rank_first_among_the_wallpapers_too(
    photo_encoder: Encoder, tmp_path: Path
) -> None:
    spec = load_spec()["wallpapers"]
    if not all(Path(p["file"]).is_file() for p in spec["photos"]):
        pytest.skip("Debian's wallpaper packages are not installed (.ci/run installs them)")
    build_photo_set(tmp_path, wallpapers=True)
    assert len(list((tmp_path / "images").iterdir())) == 49
    queries = {"a dog": "dogs", "an insect": "dragonfly", "a cat": "chelsea"}
    _assert_ranked_first(photo_encoder, tmp_path / "images", queries)


def test_small_inference_passes_give_the_same_vectors(photo_encoder: Encoder, photos: Path) -> None:
    from xmodal.crossmodal.threads import PASS_SIZE

    # The photo tower runs in passes of 4 (faster on a CPU); others keep the default.
    assert photo_encoder.pass_size == 4 < PASS_SIZE
    assert Encoder.load("xmodal-shapes").pass_size == PASS_SIZE
    names = sorted(p.name for p in photos.iterdir())[:8]
    x = torch.stack([photo_encoder.preprocess_image(_open(photos / n)) for n in names])
    whole, whole_visual = photo_encoder.encode_image_spaces(x)
    parts = [photo_encoder.encode_image_spaces(x[i : i + 4]) for i in (0, 4)]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), whole, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), whole_visual, atol=1e-4)


def test_batch_norms_are_folded_and_convolutions_channels_last_without_changing_the_output(
    photo_encoder: Encoder, photos: Path
) -> None:
    from xmodal.crossmodal.loading import load_model

    fused = photo_encoder.model.visual.trunk
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    raw = load_model(DEFAULT_MODEL).model.eval().visual.trunk  # as loaded, not folded
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in raw.modules()) == 49
    names = sorted(p.name for p in photos.iterdir())[:4]
    x = torch.stack([photo_encoder.preprocess_image(_open(photos / n)) for n in names])
    with torch.inference_mode():
        fmap_fused, fmap_raw = fused.forward_features(x), raw.forward_features(x)
        torch.testing.assert_close(fmap_fused, fmap_raw, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused(x), raw(x), atol=1e-5, rtol=0)


def test_changed_backbone_weights_are_refused(tmp_path: Path, photos: Path) -> None:
    # A copy of the package whose weights differ by one byte, found first on the path.
    real = backbone_weights_path(LITE0)
    fake = tmp_path / "site" / LITE0.package
    shutil.copytree(real.parent.parent, fake)
    blob = bytearray((fake / LITE0.weights_file).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (fake / LITE0.weights_file).write_bytes(bytes(blob))
    out = _cli(
        "index",
        str(photos),
        "--bundle",
        str(tmp_path / "b"),
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "refusing image weights" in lines[0] and LITE0.sha256 in lines[0]
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_build_command_reproduces_the_shipped_folder(tmp_path: Path) -> None:
    out = _cli("build-photo-model", "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    for name in ("open_clip_config.json", "imagenet_classes.tsv"):
        assert (tmp_path / "m" / name).read_bytes() == (PHOTO_DIR / name).read_bytes()
    built = load_file(tmp_path / "m" / "open_clip_model.safetensors")
    shipped = load_file(PHOTO_DIR / "open_clip_model.safetensors")
    assert built.keys() == shipped.keys()
    for key, tensor in shipped.items():
        torch.testing.assert_close(built[key], tensor, atol=1e-5, rtol=0)


def test_index_uses_the_photo_model_unless_told_and_warns_for_shapes(
    tmp_path: Path, photos: Path
) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(photos / name, few / name)
    out = _cli("index", str(few), "--bundle", str(tmp_path / "b"), "--json")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["model"]["name"] == "xmodal-photo"
    assert manifest["model"]["visual_dim"] == 1280
    assert manifest["indexes"]["visual"]["count"] == 3
    assert "warning" not in out.stderr
    # search and info take the bundle's model; a cat is found without naming a model
    found = _cli("search", "a cat", "--bundle", str(tmp_path / "b"), "-k", "1", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["results"][0]["path"].endswith("chelsea.png")
    # the shapes model over photos: one warning line that names the model to use
    shapes = _cli("index", str(few), "--bundle", str(tmp_path / "s"), "--model", "xmodal-shapes")
    assert shapes.returncode == 0, shapes.stderr
    warnings = [line for line in shapes.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "xmodal-photo" in warnings[0] and "3 images" in warnings[0]
    info = _cli("info", "--bundle", str(tmp_path / "s"))
    assert "xmodal-photo" in info.stderr
    # ... and none over demo scenes, what that model is for
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for i in range(3):
        scene(i, 128).save(scenes / f"{i}.png")
    scene(3, 224).save(scenes / "3.jpg", quality=85)  # varied corpora recompress to JPEG
    demo = _cli("index", str(scenes), "--bundle", str(tmp_path / "d"), "--model", "xmodal-shapes")
    assert demo.returncode == 0 and "warning" not in demo.stderr


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return _open(io.BytesIO(buf.getvalue()))


def _crop(im: Image.Image, keep: float) -> Image.Image:
    w, h = im.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return im.crop((dw, dh, w - dw, h - dh))


ALTERATIONS = {
    "crop": lambda im: _crop(im, 0.7),
    "resize": lambda im: im.resize((im.width // 3, im.height // 3)),
    "jpeg": lambda im: _jpeg(im, 20),
    "flip": ImageOps.mirror,
    "brightness": lambda im: ImageEnhance.Brightness(im).enhance(1.5),
}


def test_two_space_bundle_round_trips_and_finds_altered_copies(
    photo_encoder: Encoder, default_encoder: Encoder, photos: Path, tmp_path: Path
) -> None:
    root, bundle = tmp_path / "photos", tmp_path / "bundle"
    shutil.copytree(photos, root)
    opts = IndexOptions(bundle=bundle, roots=[root], workers=0, progress=False)
    run_index(photo_encoder, opts)
    report = verify_bundle(bundle)
    assert report.ok, report.problems
    assert report.facts["visual_ids"] == report.facts["images_ids"] == 21
    with pytest.raises(ModelMismatchError, match="xmodal-photo"):
        SearchEngine(bundle, default_encoder)  # the shapes model: another space
    assert not verify_bundle(bundle, model=default_encoder.identity).ok

    # image -> similar images searches the visual space: each altered copy finds its
    # original first (recall@1 >= 0.95 over 21 photos x 5 alterations)
    engine = SearchEngine(bundle, photo_encoder)
    assert engine.image_space == "visual"
    hits = total = 0
    for path in sorted(root.iterdir()):
        original = _open(path)
        for alter in ALTERATIONS.values():
            top = engine.image_to_images(alter(original), k=1)[0]
            hits += Path(top.path).name == path.name
            total += 1
    assert hits / total >= 0.95, f"{hits}/{total}"
    cat = next(r for r in engine.image_to_images(_open(root / "chelsea.png"), k=1))
    similar = engine.similar_images(cat.id, k=3)
    assert len(similar) == 3 and cat.id not in [r.id for r in similar]
    engine.close()

    # incremental: one photo removed, one replaced by other pixels, one added
    (root / "brick.png").unlink()
    _open(photos / "flower.jpg").save(root / "coins.png")
    _open(photos / "coffee.png").rotate(90).save(root / "added.png")
    again = run_index(photo_encoder, opts)
    assert (again.counts["removed"], again.counts["indexed"]) == (1, 2)
    report = verify_bundle(bundle)
    assert report.ok, report.problems
    assert report.facts["visual_ids"] == report.facts["images_ids"] == 21
    engine = SearchEngine(bundle, photo_encoder)
    top = engine.image_to_images(_open(photos / "flower.jpg"), k=2)
    assert {Path(r.path).name for r in top} == {"flower.jpg", "coins.png"}
    assert engine.text_to_images("a cat", k=1)[0].path.endswith("chelsea.png")
    engine.close()

    # a garbled visual index is found by verify, and the next run rebuilds it
    manifest = json.loads((bundle / "manifest.json").read_text())
    visual_file = bundle / manifest["indexes"]["visual"]["file"]
    data = bytearray(visual_file.read_bytes())
    data[-100] ^= 0xFF
    visual_file.write_bytes(bytes(data))
    problems = verify_bundle(bundle).problems
    assert any(visual_file.name in p for p in problems), problems
    run_index(photo_encoder, opts)
    assert verify_bundle(bundle).ok
