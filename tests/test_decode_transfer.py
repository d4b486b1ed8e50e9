"""The indexer's decode -> encode hand-over: uint8 pixels from torch-free workers,
converted in the parent, encoded in passes on the inference streams; all real components."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from image_fixtures import jpeg_bytes, scene
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.images import decode_image
from xmodal.crossmodal.threads import PASS_SIZE, inference_streams, thread_settings
from xmodal.indexer.bundle import Bundle
from xmodal.indexer.catalog import ImageRow
from xmodal.indexer.decode import Job, PixelFormat, draft_size, process_file
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.indexer.verify import verify_bundle

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@pytest.fixture(scope="module")
def photo() -> Encoder:
    return Encoder.load("xmodal-photo")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> Encoder:
    return Encoder.load("xmodal-tiny", str(tiny_checkpoint))


def _write_photos(folder: Path) -> list[Path]:
    """Real photos as files: JPEG at their own size, plus a 5x enlarged PNG (no
    reduced-scale decode: the worker's integer pre-reduction runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        paths.append(folder / f"{name}.jpg")
        paths[-1].write_bytes(jpeg_bytes(img))
    big = Image.fromarray(skimage_data.astronaut()).resize((2560, 2560), Image.BICUBIC)
    big.save(folder / "astronaut_big.png")
    return [*paths, folder / "astronaut_big.png"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("model", ["xmodal-photo", "xmodal-shapes"])
def test_uint8_transfer_embeds_like_the_model_preprocess(
    model: str, photo: Encoder, default_encoder: Encoder, tmp_path: Path
) -> None:
    enc = photo if model == "xmodal-photo" else default_encoder
    fmt = PixelFormat.from_preprocess(enc.preprocess)
    assert fmt is not None and fmt.size == enc.image_size
    h, w = enc.image_size
    paths = _write_photos(tmp_path / "photos")
    draft = draft_size(enc.image_size)
    sent = [process_file(Job(i, bytes(p)), fmt, draft) for i, p in enumerate(paths)]
    assert all(d.error is None for d in sent)
    assert all(d.pixels.dtype == np.uint8 and d.pixels.shape == (h, w, 3) for d in sent)
    new = enc.encode_image_tensors(fmt.to_tensor([d.pixels for d in sent]))
    # The model's own path: full-size decode, then its torchvision transform.
    ref = enc.encode_images([decode_image(p) for p in paths])
    assert _cosines(new, ref).min() >= 0.999
    # The same decoded image through both, at a size the workers do not pre-reduce:
    # the transfer alone changes nothing.
    image = decode_image(paths[1])
    image = image.resize((2 * w, 2 * h * image.height // image.width), Image.BICUBIC)
    same = fmt.to_tensor([fmt.pixels(image)])
    torch.testing.assert_close(same, enc.preprocess_image(image)[None], atol=1e-5, rtol=0)


def test_large_jpeg_decoded_at_reduced_scale_stays_close(photo: Encoder, tmp_path: Path) -> None:
    # A reduced DCT scale is another low-pass than a bicubic resize from full size: its
    # embeddings differ about as much as re-encoding the JPEG does.
    fmt = PixelFormat.from_preprocess(photo.preprocess)
    paths = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        big = img.resize((img.width * 4, img.height * 4), Image.BICUBIC)
        paths.append(tmp_path / f"{name}.jpg")
        big.save(paths[-1], quality=92, progressive=name == "coffee")
    draft = draft_size(photo.image_size)
    sent = [process_file(Job(i, bytes(p)), fmt, draft) for i, p in enumerate(paths)]
    # The catalog gets the full size, whatever scale the pixels were decoded at.
    assert all(d.width == Image.open(p).width for d, p in zip(sent, paths, strict=True))
    new = photo.encode_image_tensors(fmt.to_tensor([d.pixels for d in sent]))
    ref = photo.encode_images([decode_image(p) for p in paths])
    assert _cosines(new, ref).min() >= 0.995


def test_unknown_transform_runs_whole_in_the_workers(tiny: Encoder, tmp_path: Path) -> None:
    import open_clip

    size = tiny.image_size[0]
    letterbox = open_clip.image_transform(size, is_train=False, resize_mode="longest")
    assert PixelFormat.from_preprocess(letterbox) is None  # pads: not a plain chain
    enc = Encoder(tiny.loaded)
    enc.preprocess = letterbox
    photos = tmp_path / "p"
    photos.mkdir()
    scene(3, 80).save(photos / "a.png")
    report = run_index(
        enc, IndexOptions(bundle=tmp_path / "b", roots=[photos], workers=1, progress=False)
    )
    assert report.counts["indexed"] == 1
    stored = _stored_vectors(tmp_path / "b")
    want = enc.encode_images([decode_image(photos / "a.png")])
    assert _cosines(stored["a.png"][None], want).min() >= 0.9999


def test_passes_give_the_same_embeddings_as_one_batch(
    photo: Encoder, default_encoder: Encoder
) -> None:
    n = 2 * PASS_SIZE + 5  # a last pass shorter than the others
    torch.manual_seed(0)
    x = torch.randn(n, 3, *photo.image_size)
    joint, visual = photo.encode_image_spaces(x)
    y = torch.randn(n, 3, *default_encoder.image_size)
    emb, tokens = default_encoder.image_tokens(y)
    with inference_streams(2) as streams:
        passes = streams.submit(photo.encode_image_spaces, x)
        token_passes = streams.submit(default_encoder.image_tokens, y)
        assert len(passes.futures) == 3
        joint2, visual2 = passes.result()
        emb2, tokens2 = token_passes.result()
    np.testing.assert_allclose(joint2, joint, atol=1e-5)
    np.testing.assert_allclose(visual2, visual, atol=1e-5)
    np.testing.assert_allclose(emb2, emb, atol=1e-5)
    torch.testing.assert_close(tokens2, tokens, atol=1e-4, rtol=1e-4)


def test_stream_threads_run_one_thread_and_restore_the_settings() -> None:
    before = thread_settings()
    seen: list[int] = []
    with inference_streams(2) as streams:

        def probe(part: list[int]) -> tuple[np.ndarray]:
            seen.append(torch.get_num_threads())
            torch.ones(64, 64) @ torch.ones(64, 64)  # torch work on the stream
            return (np.array(part) * 2,)

        (doubled,) = streams.submit(probe, list(range(40)), pass_size=8).result()
        assert threading.current_thread() is threading.main_thread()
    assert doubled.tolist() == [2 * i for i in range(40)]
    assert seen and set(seen) == {1}
    assert thread_settings() == before


def test_worker_path_imports_no_torch(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(scene(1, 300)))
    code = (
        "import sys\n"
        "from xmodal.indexer.decode import Job, PixelFormat, draft_size, process_file\n"
        "fmt = PixelFormat((224,), (224, 224), 3, (0.5,) * 3, (0.5,) * 3)\n"
        "d = process_file(Job(0, sys.argv[1].encode()), fmt, (224, 224))\n"
        "assert d.error is None and d.pixels.shape == (224, 224, 3), d\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _stored_vectors(bundle: Path) -> dict[str, np.ndarray]:
    b = Bundle(bundle)
    try:
        with Session(b.engine) as s:
            rows = s.execute(select(ImageRow.relpath, ImageRow.vector)).all()
    finally:
        b.close()
    return {os.fsdecode(rel): np.frombuffer(v, np.float32) for rel, v in rows if v is not None}


def test_indexed_vectors_match_the_model_and_bad_files_fail_with_reasons(
    photo: Encoder, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    paths = _write_photos(photos)
    good = paths[0].read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (photos / "not_an_image.jpg").write_bytes(b"these are not the pixels you are looking for")
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    (photos / "one_pixel.png").write_bytes(buf.getvalue())
    bundle = tmp_path / "bundle"
    report = run_index(
        photo,
        IndexOptions(bundle=bundle, roots=[photos], workers=2, batch_size=4, progress=False),
    )
    assert report.counts["indexed"] == len(paths) + 1
    reasons = {Path(p).name: r for p, r in report.failures}
    assert set(reasons) == {"truncated.jpg", "not_an_image.jpg"}
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert "not an allowed image" in reasons["not_an_image.jpg"]
    b = Bundle(bundle)
    try:
        stored_reasons = {Path(f["path"]).name: f["reason"] for f in b.failures(None)}
    finally:
        b.close()
    assert stored_reasons == reasons
    stored = _stored_vectors(bundle)
    new = np.stack([stored[p.name] for p in paths])
    ref = photo.encode_images([decode_image(p) for p in paths])
    assert _cosines(new, ref).min() >= 0.999
    assert verify_bundle(bundle).ok
