"""The real-photo set: built from the photos installed packages ship, in the pairs format,
the same bytes every time, without importing those packages; and the README's two
commands (``xmodal photo-set``, ``xmodal eval --queries``) run end to end."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from xmodal.crossmodal.errors import XmodalError
from xmodal.crossmodal.pairs import read_pairs
from xmodal.search.evaluate import read_queries
from xmodal.training.photo_set import (
    DEBIAN_PREFIX,
    MissingPhotoPackageError,
    build_photo_set,
    load_spec,
)

from xmodal.cli import main

PACKAGES = ("skimage", "sklearn", "matplotlib", "mahotas", "pywt")
WALLPAPERS = load_spec()["wallpapers"]
needs_wallpapers = pytest.mark.skipif(
    not all(Path(p["file"]).is_file() for p in WALLPAPERS["photos"]),
    reason="Debian's wallpaper packages are not installed (.ci/run installs them): "
    "apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 plasma-workspace-wallpapers",
)


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("photos")
    return out, build_photo_set(out)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_counts_and_formats(photo_set: tuple[Path, dict]) -> None:
    out, counts = photo_set
    assert (counts["images"], counts["val"], counts["test"], counts["queries"]) == (21, 42, 21, 14)
    images = sorted((out / "images").iterdir())
    assert len(images) == 21
    for path in images:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
        assert rgb.mode == "RGB" and min(rgb.size) >= 256
        assert path.suffix in {".png", ".jpg"}
    # The files are what the pairs reader and the queries reader accept.
    val, test = read_pairs(out / "val.jsonl"), read_pairs(out / "test.jsonl")
    assert (len(val.images), len(val.captions)) == (21, 42)
    assert (len(test.images), len(test.captions)) == (21, 21)
    assert sorted(val.images) == sorted(test.images) == sorted(p.resolve() for p in images)
    queries = read_queries(out / "queries.jsonl", test)
    assert len(queries.texts) == 14
    assert all(len(r) >= 1 for r in queries.relevant)
    spec = load_spec()
    assert [q["query"] for q in spec["queries"]] == queries.texts
    assert [len(q["relevant"]) for q in spec["queries"]] == [len(r) for r in queries.relevant]


def test_sources_kept_or_converted_faithfully(photo_set: tuple[Path, dict]) -> None:
    out, counts = photo_set
    spec = {p["id"]: p for p in load_spec()["photos"]}
    for photo_id, source in counts["sources"].items():
        package, file = source.split("/", 1)
        origin = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / file
        written = next((out / "images").glob(f"{photo_id}.*"))
        assert file == spec[photo_id]["file"]
        if origin.suffix == ".jpg":  # JPEG bytes copied unchanged
            assert written.read_bytes() == origin.read_bytes()
        elif origin.suffix == ".npz":  # one grey array, as RGB pixels
            with np.load(origin) as z:
                grey = z[z.files[0]]
            pixels = np.asarray(Image.open(written))
            assert pixels.shape == (*grey.shape, 3)
            assert all((pixels[..., c] == grey).all() for c in range(3))
        else:  # PNG: the same pixels, in RGB
            want = np.asarray(Image.open(origin).convert("RGB"))
            assert (np.asarray(Image.open(written).convert("RGB")) == want).all()


def test_same_bytes_every_time(photo_set: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = photo_set
    build_photo_set(tmp_path)
    assert _digests(tmp_path) == _digests(out)


def test_the_photo_packages_are_never_imported(tmp_path: Path) -> None:
    code = (
        "import sys; from xmodal.training.photo_set import build_photo_set; "
        f"build_photo_set({str(tmp_path)!r}); "
        f"print([m for m in {PACKAGES!r} if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_missing_package_is_one_line_naming_it_and_pip(tmp_path: Path) -> None:
    spec = load_spec()
    spec["photos"][0]["package"] = "xmodal_no_such_package"
    spec["photos"][1]["package"] = "xmodal_no_such_package"  # named once
    spec["photos"][2]["package"] = "xmodal_nor_this_one"
    with pytest.raises(MissingPhotoPackageError) as err:
        build_photo_set(tmp_path, spec)
    message = str(err.value)
    assert isinstance(err.value, XmodalError) and "\n" not in message
    assert message.endswith("pip install xmodal_no_such_package xmodal_nor_this_one")
    assert message.count("xmodal_no_such_package") == 2  # the list and the pip line
    assert not (tmp_path / "images").exists()  # nothing written before the check


def test_photo_set_and_eval_commands(photo_set: tuple[Path, dict], tiny_checkpoint: Path) -> None:
    """The README's two commands (the tiny model instead of the photo model: fast)."""
    out, _ = photo_set
    runner = CliRunner()
    wrote = runner.invoke(main, ["photo-set", "--out", str(out)])
    assert wrote.exit_code == 0, wrote.output
    assert "21 images" in wrote.output and "14 queries" in wrote.output
    assert str(out / "queries.jsonl") in wrote.output
    result = runner.invoke(
        main,
        [
            "eval",
            "--pairs",
            str(out / "test.jsonl"),
            "--queries",
            str(out / "queries.jsonl"),
            "--model",
            "xmodal-tiny",
            "--pretrained",
            str(tiny_checkpoint),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["images"], doc["captions"], doc["failed_images"]) == (21, 21, 0)
    q = doc["queries"]
    assert q["count"] == 14 and q["images"] == 21 and len(q["per_query"]) == 14
    # "an animal" has one relevant photo among 21: its AP is 1/rank, at least 1/21.
    animal = next(p for p in q["per_query"] if p["query"] == "an animal")
    assert animal["relevant"] == 1 and 1 / 21 - 1e-9 <= animal["AP"] <= 1.0
    assert 1 / animal["AP"] == pytest.approx(round(1 / animal["AP"]))


@needs_wallpapers
def test_wallpapers_extend_the_set_and_its_queries(tmp_path: Path) -> None:
    counts = build_photo_set(tmp_path, wallpapers=True)
    assert (counts["images"], counts["val"], counts["test"], counts["queries"]) == (49, 72, 62, 24)
    val, test = read_pairs(tmp_path / "val.jsonl"), read_pairs(tmp_path / "test.jsonl")
    # Plasma's photos have test captions only: the val file ranks the other 36.
    assert (len(val.images), len(val.captions)) == (36, 72)
    assert (len(test.images), len(test.captions)) == (49, 62)
    queries = read_queries(tmp_path / "queries.jsonl", test)
    spec = load_spec()
    assert queries.texts == [q["query"] for q in WALLPAPERS["queries"]]
    # Every core query is kept, with its core photos among its relevant ones.
    extended = {q["query"]: set(q["relevant"]) for q in WALLPAPERS["queries"]}
    for query in spec["queries"]:
        assert set(query["relevant"]) <= extended[query["query"]], query["query"]
    # An RGB JPEG is copied byte for byte from the Debian package.
    for photo in WALLPAPERS["photos"]:
        source = Path(photo["file"])
        written = next((tmp_path / "images").glob(photo["id"] + ".*"))
        with Image.open(source) as im:
            copied = im.format == "JPEG" and im.mode == "RGB"
        if copied:
            assert written.read_bytes() == source.read_bytes(), photo["id"]


def test_a_missing_debian_package_is_one_line_naming_apt_get(tmp_path: Path) -> None:
    spec = load_spec()
    photo = spec["wallpapers"]["photos"][0]
    photo["package"] = DEBIAN_PREFIX + "xmodal-no-such-wallpapers"
    photo["file"] = str(tmp_path / "absent" / "photo.jpg")
    with pytest.raises(MissingPhotoPackageError) as err:
        build_photo_set(tmp_path / "out", spec, wallpapers=True)
    message = str(err.value)
    assert "\n" not in message and "apt-get install " in message
    assert "xmodal-no-such-wallpapers" in message.split("apt-get install ")[1]
    assert not (tmp_path / "out").exists()  # nothing written before the check
    # Without the flag the Debian photos are not needed.
    assert build_photo_set(tmp_path / "core", spec)["images"] == 21
