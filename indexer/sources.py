"""Walking photo folders: every file seen becomes an entry, a candidate or an exclusion.

Folders are walked recursively without following symlinked folders (no loops, no
escaping the root). A symlinked file is a candidate only when it resolves inside one
of the indexed roots. Formats are decided from the first bytes, not the extension:
a file whose content is an allowlisted image format is a candidate; a file named like
an image whose content is not becomes a failure (the user expects it indexed); any
other file is excluded with its reason. Paths are kept as the OS's bytes, so
non-UTF-8 names survive. What the OS refuses to show (a folder that cannot be listed or
entered, a file that cannot be stat'ed or read) is a failure marked ``unreadable``, which
the indexer never takes for a deletion.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xmodal.crossmodal.images import allowed_formats

IMAGE_SUFFIXES = frozenset(
    {
        b".jpg",
        b".jpeg",
        b".jpe",
        b".jfif",
        b".png",
        b".webp",
        b".gif",
        b".bmp",
        b".dib",
        b".tif",
        b".tiff",
        b".heic",
        b".heif",
        b".avif",
    }
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heif", b"avif", b"avis")

CANDIDATE, EXCLUDED, FAILED = "candidate", "excluded", "failed"
Known = Callable[[bytes, int, int], bool] | None


def sniff_format(head: bytes) -> str | None:
    """Image format from a file's first 16+ bytes, or None when it is not one we know."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM") and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF"
    return None


@dataclass
class Entry:
    """A file seen under a root."""

    root: bytes  # absolute root path
    relpath: bytes  # path relative to the root
    kind: str  # candidate | excluded | failed
    size: int = 0
    mtime_ns: int = 0
    format: str | None = None
    reason: str | None = None
    # The OS refused to show it (permissions, I/O error): what the catalog knows of it,
    # and of everything under it when it is a folder, is kept, not taken as deleted.
    unreadable: bool = False

    @property
    def path(self) -> bytes:
        """Absolute path bytes."""
        return os.path.join(self.root, self.relpath)

    @property
    def display(self) -> str:
        """Printable relative path."""
        return self.relpath.decode("utf-8", "replace")


def _inside(path: bytes, roots: list[bytes]) -> bool:
    return any(path == r or path.startswith(r.rstrip(b"/") + b"/") for r in roots)


def _classify(
    root: bytes, rel: bytes, st: os.stat_result, allowed: tuple[str, ...], unchanged: Known
) -> Entry:
    path = os.path.join(root, rel)
    base = Entry(root, rel, CANDIDATE, st.st_size, st.st_mtime_ns)
    if not stat.S_ISREG(st.st_mode):
        base.kind, base.reason = EXCLUDED, "not a regular file"
        return base
    if unchanged is not None and unchanged(rel, st.st_size, st.st_mtime_ns):
        return base  # indexed before with this size and mtime: no need to open it
    named_like_image = os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        base.kind, base.reason = FAILED, f"cannot read: {exc.strerror or exc}"
        base.unreadable = True
        return base
    fmt = sniff_format(head)
    if fmt is None or fmt not in allowed:
        if named_like_image:
            base.kind = FAILED
            base.reason = (
                "empty file"
                if st.st_size == 0
                else f"content is not an allowed image format ({', '.join(allowed)})"
                if fmt is None
                else f"{fmt} support is not installed (pip install pillow-heif)"
            )
        else:
            base.kind, base.reason = EXCLUDED, "not an image file"
        return base
    base.format = fmt
    return base


def walk(
    root: Path | bytes, roots: list[bytes], skip: list[bytes], unchanged: Known = None
) -> Iterator[Entry]:
    """Every file under ``root`` as an Entry (folder errors become failed entries).

    A folder that cannot be listed or entered, and a file that cannot be stat'ed or
    read, is a FAILED entry marked ``unreadable``: the caller keeps what it knew of it
    (and of everything under its relpath) instead of taking it as deleted.

    ``roots`` are all indexed roots (symlinked files must resolve inside one of them);
    ``skip`` are folders never entered (the bundle itself, when it sits in a root);
    ``unchanged(relpath, size, mtime_ns)`` says a file is known as is, so it is not
    opened to sniff its format.
    """
    root_b = os.fsencode(os.path.abspath(root))
    allowed = allowed_formats()
    seen_dirs: set[tuple[int, int]] = set()
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root_b, rel_dir) if rel_dir else root_b
        try:
            dst = os.stat(abs_dir)
            if (dst.st_dev, dst.st_ino) in seen_dirs:  # bind-mount or hard loop
                continue
            seen_dirs.add((dst.st_dev, dst.st_ino))
            with os.scandir(abs_dir) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Entry(
                root_b,
                rel_dir or b".",
                FAILED,
                reason=f"cannot list folder: {exc.strerror or exc}",
                unreadable=True,
            )
            continue
        for child in children:
            rel = os.path.join(rel_dir, child.name) if rel_dir else child.name
            abs_path = os.path.join(root_b, rel)
            if any(abs_path == s or abs_path.startswith(s + b"/") for s in skip):
                continue
            try:
                is_link = child.is_symlink()
                if child.is_dir(follow_symlinks=False):
                    stack.append(rel)
                    continue
                if is_link:
                    target = os.path.realpath(abs_path)
                    if os.path.isdir(target):
                        yield Entry(root_b, rel, EXCLUDED, reason="symlinked folder not followed")
                        continue
                    if not os.path.exists(target):
                        yield Entry(root_b, rel, FAILED, reason="broken symlink")
                        continue
                    if not _inside(target, roots):
                        yield Entry(
                            root_b,
                            rel,
                            EXCLUDED,
                            reason="symlink leads outside the indexed folders",
                        )
                        continue
                st = os.stat(abs_path)
            except OSError as exc:  # may be a folder: its contents are unknown, not gone
                yield Entry(
                    root_b,
                    rel,
                    FAILED,
                    reason=f"cannot stat: {exc.strerror or exc}",
                    unreadable=True,
                )
                continue
            yield _classify(root_b, rel, st, allowed, unchanged)
