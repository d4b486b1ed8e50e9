"""Caption corpora: CSV/TSV with a header, JSONL, or TXT (one caption per line).

CSV/TSV need a ``caption`` column and may have an ``image`` column; JSONL lines are
objects with the same keys (the demo corpus format); TXT lines are captions. The
format follows the file's extension. Malformed rows are reported with their file and
line number and skipped, and the rest of the file is read: bytes that are not UTF-8,
JSON that does not parse (nested too deep, numbers too long), lone surrogates
(``"\\ud800"``), control characters, lines or captions over the limits. Lines end at
``\\n`` only, as JSONL defines them and as editors number them: U+2028, U+2029 and
U+0085 inside a caption are text, not line ends. Exact duplicate captions are
collapsed (their image links kept).

Only regular files are read (a FIFO would block forever, ``/dev/zero`` never ends),
and at most ``MAX_CAPTION_FILE_BYTES`` of them: a whole file is refused with a message
naming it, before any of it is read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xmodal.crossmodal.errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
MAX_CAPTION_CHARS = 2000
# One line (one CSV record) of a corpus file. A JSONL line holds a caption of up to
# MAX_CAPTION_CHARS (6 characters each when written as \uXXXX escapes), an image path
# (4096 bytes on Linux) and its keys: 32k characters leave room for all of that.
MAX_CAPTION_LINE_CHARS = 32_768
# Corpus files are read whole into memory; a bigger corpus is given as several files.
MAX_CAPTION_FILE_BYTES = 256 * 2**20
# Integers in a JSONL line (captions need none): longer ones are refused per line
# rather than meeting Python's 4300-digit limit, which names neither file nor line.
MAX_JSON_INT_DIGITS = 100


@dataclass
class CaptionRecord:
    """One caption as read from a corpus file."""

    text: str
    image: str | None  # as written in the file (path relative to the file, or absolute)
    source: str  # "file:line"

    @property
    def text_hash(self) -> str:
        """Identity of the caption text (exact duplicates collapse)."""
        return caption_hash(self.text)


@dataclass
class CaptionFile:
    """The records and problems of one corpus file."""

    path: Path
    records: list[CaptionRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duplicates: int = 0


def caption_hash(text: str) -> str:
    """sha256 of the whitespace-normalised caption."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def normalise(text: str) -> str:
    """Collapse runs of whitespace; strip the ends."""
    return " ".join(text.split())


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _check_regular(path: Path, st: os.stat_result, max_bytes: int, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path} is {_file_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise DataError(
            f"{what} {path} is {st.st_size:,} bytes, more than the limit of {max_bytes:,}"
        )


def read_regular_file(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``.

    Anything else (a FIFO, a device such as ``/dev/zero``, a directory, even behind a
    symlink) raises DataError naming ``what`` and the path, without blocking or reading
    it. The open is non-blocking and the check repeated on the open file, so a file
    swapped for a FIFO in between cannot hang the reader either. Also used by the CLI
    for ``xmodal search --image``.
    """
    path = Path(path)
    try:
        _check_regular(path, os.stat(path), max_bytes, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        try:
            _check_regular(path, os.fstat(fd), max_bytes, what)
            data = f.read(max_bytes + 1)  # it may have grown since
        except OSError as exc:
            raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise DataError(f"{what} {path} is more than the limit of {max_bytes:,} bytes")
    return data


def check_caption_file(path: str | Path) -> str:
    """The format of a corpus file, after checking its type, kind and size.

    Cheap (no reading): the CLI calls it before a run starts, so a bad ``--captions``
    argument fails in a second, not after the images are indexed. Raises DataError.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown caption file type {path.suffix!r} "
            f"(expected one of {', '.join(sorted(FORMATS))})"
        )
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"cannot read caption file {path}: {exc.strerror or exc}") from exc
    _check_regular(path, st, MAX_CAPTION_FILE_BYTES, "caption file")
    return kind


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(text: str) -> str | None:
    """Why ``text`` (already normalised) cannot be a stored caption or reference."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate {text[exc.start]!r} (not valid Unicode text)"
    for ch in text:
        # Whitespace controls are gone after normalise(); the rest (NUL, ESC...) have no
        # place in a caption, and PostgreSQL refuses NUL outright.
        if unicodedata.category(ch) == "Cc":
            return f"control character {ch!r}"
    return None


def _bad_reference(ref: str) -> str | None:
    """Why an image reference cannot name a file (file names may hold other controls)."""
    if not _is_utf8(ref):
        return "lone surrogate (not valid Unicode text)"
    return "NUL character" if "\x00" in ref else None


def _check(text: object, where: str, problems: list[str]) -> str | None:
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{where}: empty or missing caption")
        return None
    text = normalise(text)
    if len(text) > MAX_CAPTION_CHARS:
        problems.append(f"{where}: caption longer than {MAX_CAPTION_CHARS} characters")
        return None
    bad = _bad_text(text)
    if bad:
        problems.append(f"{where}: caption holds a {bad}")
        return None
    return text


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"a number of {len(digits):,} digits, more than {MAX_JSON_INT_DIGITS}")
    return int(digits)


def _lines(content: str, name: str, problems: list[str]) -> Iterator[tuple[str, str]]:
    """(where, line) for each non-blank line within the limits; the others reported."""
    for lineno, line in enumerate(content.split("\n"), 1):
        where = f"{name}:{lineno}"
        if len(line) > MAX_CAPTION_LINE_CHARS:
            problems.append(f"{where}: line longer than {MAX_CAPTION_LINE_CHARS:,} characters")
            continue
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as exc:  # surrogateescape'd bytes that were not UTF-8
            problems.append(f"{where}: not UTF-8 text (column {exc.start + 1})")
            continue
        yield where, line


def _read_jsonl(content: str, name: str, out: CaptionFile) -> None:
    for where, line in _lines(content, name, out.problems):
        try:
            row = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as exc:
            out.problems.append(f"{where}: not JSON ({exc.msg})")
            continue
        except RecursionError:
            out.problems.append(f"{where}: not JSON (nested too deeply)")
            continue
        except ValueError as exc:  # _json_int's refusal
            out.problems.append(f"{where}: not JSON ({exc})")
            continue
        if not isinstance(row, dict):
            out.problems.append(f"{where}: not a JSON object")
            continue
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            out.problems.append(f"{where}: 'image' is not a string")
            continue
        bad_image = _bad_reference(image) if image else None
        if bad_image:
            out.problems.append(f"{where}: 'image' holds a {bad_image}")
            continue
        text = _check(row.get("caption"), where, out.problems)
        if text:
            out.records.append(CaptionRecord(text, image or None, where))


def _read_txt(content: str, name: str, out: CaptionFile) -> None:
    for where, line in _lines(content, name, out.problems):
        text = _check(line, where, out.problems)
        if text:
            out.records.append(CaptionRecord(text, None, where))


def _read_table(content: str, name: str, kind: str, out: CaptionFile) -> None:
    reader = csv.reader(io.StringIO(content), delimiter="\t" if kind == "tsv" else ",")
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        out.problems.append(f"{name}: empty file")
        return
    except csv.Error as exc:
        raise DataError(f"{name}:1: unreadable header ({exc})") from exc
    if "caption" not in header:
        raise DataError(f"{name}:1: header has no 'caption' column (found {header})")
    c_col = header.index("caption")
    i_col = header.index("image") if "image" in header else None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            out.problems.append(f"{name}:{reader.line_num}: {exc}")
            continue
        where = f"{name}:{reader.line_num}"
        if not row or not any(cell.strip() for cell in row):
            continue
        if sum(len(cell) for cell in row) > MAX_CAPTION_LINE_CHARS:
            out.problems.append(f"{where}: row longer than {MAX_CAPTION_LINE_CHARS:,} characters")
            continue
        if len(row) != len(header):
            out.problems.append(f"{where}: {len(row)} fields, header has {len(header)}")
            continue
        if not all(_is_utf8(cell) for cell in row):
            out.problems.append(f"{where}: not UTF-8 text")
            continue
        image = row[i_col].strip() if i_col is not None else None
        bad_image = _bad_reference(image) if image else None
        if bad_image:
            out.problems.append(f"{where}: 'image' holds a {bad_image}")
            continue
        text = _check(row[c_col], where, out.problems)
        if text:
            out.records.append(CaptionRecord(text, image or None, where))


def read_caption_file(path: str | Path) -> CaptionFile:
    """Parse a corpus file; raises DataError (a ValueError) for an unknown extension or
    a file that cannot be read at all (not a regular file, over the size limit,
    unreadable, a CSV without a ``caption`` column). Bad lines are ``problems``."""
    path = Path(path)
    kind = check_caption_file(path)
    raw = read_regular_file(path, MAX_CAPTION_FILE_BYTES, "caption file")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Some lines are not UTF-8: keep their bytes as lone surrogates, so that those
        # lines (and only those) are reported and skipped.
        content = raw.decode("utf-8-sig", errors="surrogateescape")
    out = CaptionFile(path)
    if kind == "txt":
        _read_txt(content, path.name, out)
    elif kind == "jsonl":
        _read_jsonl(content, path.name, out)
    else:
        _read_table(content, path.name, kind, out)
    return out
