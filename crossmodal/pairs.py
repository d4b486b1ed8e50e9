"""Image-caption pair files: JSONL lines ``{"image": "<path>", "caption": "..."}``.

The demo corpus writes this format and users bring their own pairs in it
(Flickr30k/COCO style: several lines per image). Relative image paths are relative to
the pairs file's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError


@dataclass
class PairSet:
    """Unique images, all captions, and which image each caption describes."""

    source: Path
    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # [captions] int index into images
    problems: list[str] = field(default_factory=list)  # malformed lines, when not strict

    def captions_of(self) -> list[list[int]]:
        """For each image, the indices of its captions."""
        out: list[list[int]] = [[] for _ in self.images]
        for c, i in enumerate(self.caption_image.tolist()):
            out[i].append(c)
        return out

    def subset_images(self, keep: list[int]) -> PairSet:
        """The pairs of the images at ``keep`` (in that order), captions re-indexed."""
        remap = {old: new for new, old in enumerate(keep)}
        pairs = [
            (remap[i], c)
            for c, i in zip(self.captions, self.caption_image.tolist(), strict=True)
            if i in remap
        ]
        return PairSet(
            source=self.source,
            images=[self.images[i] for i in keep],
            captions=[c for _, c in pairs],
            caption_image=np.array([i for i, _ in pairs], dtype=np.int64),
            problems=list(self.problems),
        )


def read_pairs(path: str | Path, strict: bool = True, limit_images: int | None = None) -> PairSet:
    """Parse a pairs file.

    With ``strict`` a malformed line raises DataError naming the file and line;
    otherwise it is skipped and described in ``problems``. ``limit_images`` keeps the
    first N distinct images (for quick runs).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    root = path.resolve().parent
    index: dict[Path, int] = {}
    captions: list[str] = []
    owner: list[int] = []
    problems: list[str] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row, problem = None, f"not JSON ({exc.msg})"
        if row is not None:
            if not isinstance(row, dict):
                problem = "not a JSON object"
            elif not isinstance(row.get("image"), str) or not row["image"].strip():
                problem = "missing 'image' (a path string)"
            elif not isinstance(row.get("caption"), str) or not row["caption"].strip():
                problem = "missing 'caption' (a non-empty string)"
        if problem:
            message = f"{path}:{lineno}: {problem}"
            if strict:
                raise DataError(message)
            problems.append(message)
            continue
        image = Path(row["image"])
        image = image if image.is_absolute() else root / image
        if image not in index:
            if limit_images is not None and len(index) >= limit_images:
                continue
            index[image] = len(index)
        captions.append(" ".join(row["caption"].split()))
        owner.append(index[image])
    if not captions:
        raise DataError(f"{path}: no image-caption pairs")
    return PairSet(
        source=path,
        images=list(index),
        captions=captions,
        caption_image=np.array(owner, dtype=np.int64),
        problems=problems,
    )
