"""Indexing real files into a bundle: every file accounted for, incremental, verifiable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from image_fixtures import exif_rotated_pair, scene, write_awkward_tree
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.bundle import Bundle, read_manifest
from xmodal.indexer.catalog import ImageRow, Root
from xmodal.indexer.pipeline import IndexOptions, IndexRunError, run_index
from xmodal.indexer.verify import verify_bundle


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> Encoder:
    return Encoder.load("xmodal-tiny", str(tiny_checkpoint))


def index(enc: Encoder, bundle: Path, *roots: Path, workers: int = 0, **kw):
    opts = IndexOptions(bundle=bundle, roots=list(roots), workers=workers, progress=False, **kw)
    return run_index(enc, opts)


def statuses(bundle: Path) -> dict[str, str]:
    b = Bundle(bundle)
    with Session(b.engine) as s:
        rows = s.execute(select(ImageRow.relpath, ImageRow.status)).all()
    b.close()
    return {os.fsdecode(rel): status for rel, status in rows}


def test_every_awkward_file_is_accounted_for(tiny: Encoder, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    expected = write_awkward_tree(photos)
    report = index(tiny, tmp_path / "bundle", photos, workers=2)
    c = report.counts
    assert c["seen"] == len(expected)
    assert c["seen"] == c["indexed"] + c["unchanged"] + c["failed"] + c["excluded"]
    assert statuses(tmp_path / "bundle") == expected
    reasons = dict(report.failures)
    assert "empty file" in reasons[str(photos / "zero.jpg")]
    assert "bomb" in reasons[str(photos / "bomb.png")]
    assert "broken symlink" in reasons[str(photos / "dangling.png")]
    assert verify_bundle(tmp_path / "bundle").ok
    # Failures are stored with their reasons and listed by the bundle.
    listed = {f["path"] for f in Bundle(tmp_path / "bundle").failures(None)}
    assert str(photos / "truncated.jpg") in listed


def test_exif_rotated_embeds_like_the_rotated_picture(tiny: Encoder, tmp_path: Path) -> None:
    photos = tmp_path / "p"
    photos.mkdir()
    exif_rotated_pair(photos)
    index(tiny, tmp_path / "b", photos, workers=1)
    b = Bundle(tmp_path / "b")
    with Session(b.engine) as s:
        ids = dict(s.execute(select(ImageRow.display, ImageRow.id)).all())
    tagged, upright = b.vectors("images", [ids["tagged.jpg"], ids["upright.jpg"]])
    assert float(tagged @ upright) > 0.99


def test_source_files_are_never_modified(tiny: Encoder, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_awkward_tree(photos)
    before = {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for p in photos.rglob("*")
        if p.is_file() and not p.is_symlink() and not p.is_fifo()
    }
    index(tiny, tmp_path / "bundle", photos)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before}
    assert before == after


def _tree(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img_{i:04d}.png"
        scene(i, 32).save(path)
        paths.append(path)
    return paths


def test_incremental_add_modify_delete_rename(tiny: Encoder, tmp_path: Path) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    paths = _tree(photos, 12)
    assert index(tiny, bundle, photos).counts["indexed"] == 12
    first = Bundle(bundle).vectors("images", list(range(1, 13)))

    again = index(tiny, bundle, photos)
    assert (again.counts["indexed"], again.counts["unchanged"]) == (0, 12)
    # Nothing changed: no new generation for serving processes to reload.
    assert again.generation == read_manifest(bundle).generation == 1

    paths[0].unlink()  # delete
    scene(999, 32).save(paths[1])  # modify (new content, same name)
    os.utime(paths[1], ns=(1, 1))  # ...with an old mtime: size+mtime differ, hash decides
    paths[2].rename(photos / "renamed.png")  # rename
    (photos / "moved").mkdir()
    paths[3].rename(photos / "moved" / "img_0003.png")  # move
    os.utime(paths[4])  # touch only: same bytes
    _tree(photos, 2, start=100)  # add
    c = index(tiny, bundle, photos).counts
    assert c["removed"] == 1
    assert c["renamed"] == 2
    assert c["indexed"] == 3  # the modified file and the two new ones: nothing else encoded
    assert c["unchanged"] == 12 - 1 - 1 + 0  # 12 minus deleted minus modified
    assert c["seen"] == 13
    b = Bundle(bundle)
    with Session(b.engine) as s:
        rows = {r.display: r for r in s.execute(select(ImageRow)).scalars()}
    assert set(rows) == {p.relative_to(photos).as_posix() for p in photos.rglob("*.png")}
    # A rename keeps its id, so its vector is the one computed on the first run.
    renamed = b.vectors("images", [rows["renamed.png"].id])[0]
    np.testing.assert_array_equal(renamed, first[2])
    # The modified file keeps its id; the published index must hold its new vector.
    modified = rows[paths[1].relative_to(photos).as_posix()].id
    new_vec = b.vectors("images", [modified])
    assert not np.allclose(new_vec[0], first[1])
    scores, ids = b.search("images", new_vec, 1)
    assert ids[0, 0] == modified and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert verify_bundle(bundle).ok
    assert read_manifest(bundle).generation == 2


def test_verify_finds_an_index_holding_other_vectors(tiny: Encoder, tmp_path: Path) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    _tree(photos, 6)
    index(tiny, bundle, photos)
    assert verify_bundle(bundle).ok
    b = Bundle(bundle)
    other = -b.vectors("images", [1])[0]  # a unit vector no image has
    with Session(b.engine) as s, s.begin():  # the catalog changes, the index does not
        s.execute(update(ImageRow).where(ImageRow.id == 1).values(vector=other.tobytes()))
    b.close()
    report = verify_bundle(bundle)
    assert any("holds other vectors than the catalog for 1 of 6" in p for p in report.problems)


def test_copies_reuse_the_stored_vector(tiny: Encoder, tmp_path: Path) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    paths = _tree(photos, 3)
    index(tiny, bundle, photos)
    shutil.copy(paths[0], photos / "copy of img_0000.png")
    c = index(tiny, bundle, photos).counts
    assert (c["indexed"], c["reused"]) == (1, 1)
    assert verify_bundle(bundle).ok


def test_missing_or_emptied_root_aborts_without_deleting(tiny: Encoder, tmp_path: Path) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    paths = _tree(photos, 4)
    index(tiny, bundle, photos)
    shutil.rmtree(photos)
    with pytest.raises(IndexRunError, match="not found"):
        index(tiny, bundle, photos)
    photos.mkdir()  # an unmounted mount point looks like this
    with pytest.raises(IndexRunError, match="empty but the catalog holds 4"):
        index(tiny, bundle, photos)
    assert len(statuses(bundle)) == 4
    assert verify_bundle(bundle).ok
    c = index(tiny, bundle, photos, allow_empty_roots=True).counts
    assert c["removed"] == 4 and statuses(bundle) == {}
    assert not paths[0].exists()


def test_bundle_inside_the_photo_folder_is_not_indexed(tiny: Encoder, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _tree(photos, 2)
    index(tiny, photos / ".xmodal", photos)
    assert index(tiny, photos / ".xmodal", photos).counts["seen"] == 2


def test_unchanged_10000_file_folder_encodes_nothing(tiny: Encoder, tmp_path: Path) -> None:
    photos, bundle = tmp_path / "photos", tmp_path / "bundle"
    photos.mkdir()
    blob = tmp_path / "seed.png"
    scene(0, 8).save(blob)
    data = blob.read_bytes()
    for i in range(10_000):
        # Distinct bytes per file (a PNG text chunk would do too): append a counter
        # after IEND, which decoders ignore.
        (photos / f"{i:05d}.png").write_bytes(data + i.to_bytes(4, "big"))
    first = index(tiny, bundle, photos, batch_size=512).counts
    assert first["indexed"] == 10_000
    second = index(tiny, bundle, photos, batch_size=512).counts
    assert (second["indexed"], second["unchanged"], second["seen"]) == (0, 10_000, 10_000)


def test_another_model_is_refused(tiny: Encoder, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _tree(photos, 2)
    index(tiny, tmp_path / "b", photos)
    other = Encoder.load("xmodal-tiny")  # random weights: another model
    with pytest.raises(IndexRunError, match="was built with xmodal-tiny"):
        index(other, tmp_path / "b", photos)


def test_roots_are_recorded(tiny: Encoder, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a, 2)
    _tree(b, 3, start=10)
    index(tiny, tmp_path / "bundle", a, b)
    bundle = Bundle(tmp_path / "bundle")
    with Session(bundle.engine) as s:
        roots = [r.display for r in s.execute(select(Root)).scalars()]
    assert sorted(roots) == sorted([str(a.resolve()), str(b.resolve())])
    assert read_manifest(tmp_path / "bundle").counts["images_indexed"] == 5
