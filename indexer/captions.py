"""Caption corpora: CSV/TSV with a header, JSONL, or TXT (one caption per line).

CSV/TSV need a ``caption`` column and may have an ``image`` column; JSONL lines are
objects with the same keys (the demo corpus format); TXT lines are captions. The
format follows the file's extension. Malformed rows are reported with their line
number and skipped; exact duplicate captions are collapsed (their image links kept).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
MAX_CAPTION_CHARS = 2000


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


def _check(text: object, where: str, problems: list[str]) -> str | None:
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{where}: empty or missing caption")
        return None
    text = normalise(text)
    if len(text) > MAX_CAPTION_CHARS:
        problems.append(f"{where}: caption longer than {MAX_CAPTION_CHARS} characters")
        return None
    return text


def read_caption_file(path: str | Path) -> CaptionFile:
    """Parse a corpus file; raises ValueError for an unknown extension or unreadable file."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{path}: unknown caption file type {path.suffix!r} "
            f"(expected one of {', '.join(sorted(FORMATS))})"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read caption file {path}: {exc.strerror or exc}") from exc
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    out = CaptionFile(path)
    name = path.name
    if kind == "txt":
        for lineno, line in enumerate(content.splitlines(), 1):
            if line.strip():
                text = _check(line, f"{name}:{lineno}", out.problems)
                if text:
                    out.records.append(CaptionRecord(text, None, f"{name}:{lineno}"))
    elif kind == "jsonl":
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                out.problems.append(f"{where}: not JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                out.problems.append(f"{where}: not a JSON object")
                continue
            text = _check(row.get("caption"), where, out.problems)
            image = row.get("image")
            if image is not None and not isinstance(image, str):
                out.problems.append(f"{where}: 'image' is not a string")
                continue
            if text:
                out.records.append(CaptionRecord(text, image or None, where))
    else:
        reader = csv.reader(io.StringIO(content), delimiter="\t" if kind == "tsv" else ",")
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            out.problems.append(f"{name}: empty file")
            return out
        except csv.Error as exc:
            raise ValueError(f"{name}:1: unreadable header ({exc})") from exc
        if "caption" not in header:
            raise ValueError(f"{name}:1: header has no 'caption' column (found {header})")
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
            if len(row) != len(header):
                out.problems.append(f"{where}: {len(row)} fields, header has {len(header)}")
                continue
            text = _check(row[c_col], where, out.problems)
            image = row[i_col].strip() if i_col is not None else None
            if text:
                out.records.append(CaptionRecord(text, image or None, where))
    return out
