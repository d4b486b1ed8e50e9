"""``xmodal photo-set``: the real-photo benchmark, from photographs installed packages ship.

The photos and their captions are chosen in ``photo_set.json`` (beside this module):
each photo is a file inside an installed package (scikit-image, scikit-learn,
matplotlib, mahotas, PyWavelets) with two "val" captions, for tuning the photo model,
and one "test" caption, evaluated once after tuning; the queries each name several
relevant photos. Its "wallpapers" section adds photographs that Debian's wallpaper
packages ship (``"package": "deb:NAME"``, an absolute ``file``), captioned after the
model's recipe was fixed, and queries over both; ``wallpapers=True`` includes them.
``build_photo_set`` writes the set in the pairs format ``xmodal eval`` reads::

    out/images/<id>.png|.jpg   the photos, RGB
    out/val.jsonl              {"image": "images/<id>.png", "caption": ...}, 2 per photo
    out/test.jsonl             the same, 1 per photo
    out/queries.jsonl          {"query": ..., "relevant": ["images/<id>.png", ...]}

The packages are found, never imported (importing scikit-learn or matplotlib takes
seconds and pulls in much more). Same packages, same bytes: a source that already is an
8-bit RGB PNG or JPEG is copied unchanged (no re-encoding), anything else (greyscale
PNGs, PyWavelets' ``.npz`` arrays) is converted to RGB and written as PNG.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from xmodal.crossmodal.errors import XmodalError

SPEC_FILE = "photo_set.json"
# Import name -> the name pip installs it by, where they differ.
PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "pywt": "PyWavelets"}
# A photo's "package" with this prefix names a Debian package; its "file" is absolute.
DEBIAN_PREFIX = "deb:"
COPIED_FORMATS = {"PNG": ".png", "JPEG": ".jpg"}


class PhotoSetError(XmodalError):
    """A photo of the set cannot be found or read, or the set's spec is malformed."""


class MissingPhotoPackageError(PhotoSetError):
    """A package that ships photos of the set is not installed."""


def load_spec() -> dict[str, Any]:
    """The packaged spec: {"about", "photos": [...], "queries": [...]}."""
    return json.loads(files("xmodal.training").joinpath(SPEC_FILE).read_text(encoding="utf-8"))


def _check_spec(spec: dict[str, Any]) -> None:
    """Unique photo ids, and queries that name only photos of the set."""
    ids = [p["id"] for p in spec["photos"]]
    if len(set(ids)) != len(ids):
        raise PhotoSetError(f"photo set: a photo id is used twice in {sorted(ids)}")
    for query in spec["queries"]:
        unknown = [r for r in query["relevant"] if r not in ids]
        if unknown:
            raise PhotoSetError(
                f"photo set: query {query['query']!r} names no photo {unknown[0]!r}"
            )


def with_wallpapers(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with its "wallpapers" photos added and its queries replaced by theirs."""
    extra = spec["wallpapers"]
    return {
        "about": spec["about"],
        "photos": spec["photos"] + extra["photos"],
        "queries": extra["queries"],
    }


def _check_debian_files(photos: list[dict[str, Any]]) -> None:
    """For photos from Debian packages: a MissingPhotoPackageError naming every package
    whose photo files are absent, and its ``apt-get install`` line."""
    missing = {
        p["package"].removeprefix(DEBIAN_PREFIX): p["file"]
        for p in photos
        if not Path(p["file"]).is_file()
    }
    if missing:
        names = " ".join(missing)
        first = next(iter(missing.values()))
        raise MissingPhotoPackageError(
            f"the photo set's wallpapers need Debian packages {names} (no {first}): "
            f"apt-get install {names}"
        )


def package_folders(packages: list[str]) -> dict[str, list[Path]]:
    """Each Python package's folders, found without importing it; a
    MissingPhotoPackageError naming every missing one and its ``pip install`` line."""
    found: dict[str, list[Path]] = {}
    missing: list[str] = []
    for name in dict.fromkeys(packages):  # each once, in order
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        folders = spec.submodule_search_locations if spec is not None else None
        if not folders:
            missing.append(name)
        else:
            found[name] = [Path(f) for f in folders]
    if missing:
        pip = " ".join(PIP_NAMES.get(m, m) for m in missing)
        raise MissingPhotoPackageError(
            f"the photo set needs {', '.join(missing)}, not installed: pip install {pip}"
        )
    return found


def _source(photo: dict[str, Any], folders: list[Path]) -> Path:
    """The photo's file inside its package (its path is relative to the package folder)."""
    for folder in folders:
        path = folder / photo["file"]
        if path.is_file():
            return path
    raise PhotoSetError(
        f"photo {photo['id']!r}: {photo['file']} is not in the installed {photo['package']} "
        f"({folders[0]}); another version of {photo['package']} may not ship it"
    )


def _npz_image(path: Path) -> Image.Image:
    """The one 8-bit array (greyscale or RGB) an ``.npz`` file holds, as an image."""
    with np.load(path, allow_pickle=False) as z:
        arrays = [z[k] for k in z.files]
    ok = len(arrays) == 1 and arrays[0].dtype == np.uint8
    ok = ok and (arrays[0].ndim == 2 or (arrays[0].ndim == 3 and arrays[0].shape[2] == 3))
    if not ok:
        shapes = [f"{a.dtype}{list(a.shape)}" for a in arrays]
        raise PhotoSetError(f"{path}: want one 8-bit image array, found {shapes}")
    return Image.fromarray(arrays[0])


def write_photo(photo: dict[str, Any], source: Path, images: Path) -> str:
    """Write one photo into ``images``; its file name (``<id>.png`` or ``<id>.jpg``)."""
    try:
        if source.suffix == ".npz":
            image, fmt = _npz_image(source), None
        else:
            image = Image.open(source)
            fmt = image.format
            image.load()  # decode now: a broken source fails here, naming its file
    except (OSError, ValueError) as exc:
        raise PhotoSetError(f"photo {photo['id']!r}: cannot read {source}: {exc}") from exc
    if fmt in COPIED_FORMATS and image.mode == "RGB":
        name = photo["id"] + COPIED_FORMATS[fmt]
        shutil.copyfile(source, images / name)
        return name
    name = photo["id"] + ".png"
    rgb = image.convert("RGB")
    icc = image.info.get("icc_profile")
    rgb.save(images / name, "PNG", **({"icc_profile": icc} if icc else {}))
    return name


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_photo_set(
    out: Path, spec: dict[str, Any] | None = None, wallpapers: bool = False
) -> dict[str, Any]:
    """Write the photo set (default: the packaged spec) under ``out``; with
    ``wallpapers``, its Debian wallpaper photos and their queries too.

    Returns counts ("images", "val", "test", "queries"), the files written ("files")
    and where each photo came from ("sources": id -> package-relative path).
    """
    spec = load_spec() if spec is None else spec
    if wallpapers:
        spec = with_wallpapers(spec)
    _check_spec(spec)
    debian = [p for p in spec["photos"] if p["package"].startswith(DEBIAN_PREFIX)]
    python = [p for p in spec["photos"] if not p["package"].startswith(DEBIAN_PREFIX)]
    _check_debian_files(debian)
    folders = package_folders([p["package"] for p in python])
    sources = {p["id"]: _source(p, folders[p["package"]]) for p in python}
    sources |= {p["id"]: Path(p["file"]) for p in debian}
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = {p["id"]: f"images/{write_photo(p, sources[p['id']], images)}" for p in spec["photos"]}
    splits = {
        split: [{"image": paths[p["id"]], "caption": c} for p in spec["photos"] for c in p[split]]
        for split in ("val", "test")
    }
    for split, rows in splits.items():
        _write_jsonl(out / f"{split}.jsonl", rows)
    queries = [
        {"query": q["query"], "relevant": [paths[r] for r in q["relevant"]]}
        for q in spec["queries"]
    ]
    _write_jsonl(out / "queries.jsonl", queries)
    return {
        "images": len(paths),
        "val": len(splits["val"]),
        "test": len(splits["test"]),
        "queries": len(queries),
        "files": {
            "images": str(images),
            **{split: str(out / f"{split}.jsonl") for split in ("val", "test", "queries")},
        },
        "sources": {p["id"]: f"{p['package']}/{p['file']}" for p in spec["photos"]},
    }
