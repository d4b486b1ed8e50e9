"""Caption corpora: CSV/TSV/JSONL/TXT, duplicates collapsed, malformed rows reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_fixtures import scene
from sqlalchemy import select
from sqlalchemy.orm import Session
from xmodal.crossmodal.encoder import Encoder
from xmodal.indexer.bundle import Bundle
from xmodal.indexer.captions import read_caption_file
from xmodal.indexer.catalog import CaptionLink, CaptionRow
from xmodal.indexer.pipeline import IndexOptions, IndexRunError, run_index


def test_csv_with_header_and_bad_rows(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text('image,caption\na.png,"a red, round thing"\nb.png,\nc.png,x,extra\n,no image\n')
    parsed = read_caption_file(f)
    assert [(r.text, r.image) for r in parsed.records] == [
        ("a red, round thing", "a.png"),
        ("no image", None),
    ]
    assert parsed.problems == [
        "c.csv:3: empty or missing caption",
        "c.csv:4: 3 fields, header has 2",
    ]


def test_tsv_txt_jsonl(tmp_path: Path) -> None:
    (tmp_path / "c.tsv").write_text("caption\timage\nfirst\tx.png\n")
    (tmp_path / "c.txt").write_text("one caption\n\n  two   spaced  \n")
    (tmp_path / "c.jsonl").write_text(
        '{"caption": "ok"}\nnot json\n[1]\n{"image": 3, "caption": "b"}\n'
    )
    assert [(r.text, r.image) for r in read_caption_file(tmp_path / "c.tsv").records] == [
        ("first", "x.png")
    ]
    assert [r.text for r in read_caption_file(tmp_path / "c.txt").records] == [
        "one caption",
        "two spaced",
    ]
    j = read_caption_file(tmp_path / "c.jsonl")
    assert [r.text for r in j.records] == ["ok"]
    assert [p.split(": ")[0] for p in j.problems] == ["c.jsonl:2", "c.jsonl:3", "c.jsonl:4"]


def test_unknown_type_and_missing_column(tmp_path: Path) -> None:
    (tmp_path / "c.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="unknown caption file type"):
        read_caption_file(tmp_path / "c.xml")
    (tmp_path / "d.csv").write_text("text,image\nhello,a.png\n")
    with pytest.raises(ValueError, match="no 'caption' column"):
        read_caption_file(tmp_path / "d.csv")


def test_indexing_links_and_collapses(tiny_checkpoint: Path, tmp_path: Path) -> None:
    enc = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        scene(len(name), 24).save(photos / name)
    corpus = tmp_path / "caps.jsonl"
    corpus.write_text(
        '{"image": "photos/a.png", "caption": "a picture of A"}\n'
        '{"image": "photos/b.png", "caption": "a picture of A"}\n'  # duplicate text
        '{"image": "photos/zzz.png", "caption": "nowhere"}\n'
        '{"caption": "free text"}\n'
        "garbage\n"
    )
    bundle = tmp_path / "bundle"
    report = run_index(
        enc,
        IndexOptions(bundle=bundle, roots=[photos], captions=[corpus], workers=0, progress=False),
    )
    c = report.counts
    assert (c["caption_rows"], c["caption_duplicates"], c["captions_indexed"]) == (4, 1, 3)
    assert c["caption_links_unresolved"] == 1 and c["caption_rows_skipped"] == 1
    assert report.problems == ["caps.jsonl:5: not JSON (Expecting value)"]
    b = Bundle(bundle)
    with Session(b.engine) as s:
        texts = sorted(s.execute(select(CaptionRow.text)).scalars())
        links = s.execute(select(CaptionLink)).scalars().all()
    assert texts == ["a picture of A", "free text", "nowhere"]
    assert len(links) == 2  # the duplicate caption describes both images
    # Re-indexing the same corpus adds nothing.
    again = run_index(
        enc, IndexOptions(bundle=bundle, captions=[corpus], workers=0, progress=False)
    )
    assert again.counts["captions_indexed"] == 0 and again.counts["captions_unchanged"] == 3
    with pytest.raises(IndexRunError, match="unknown caption file type"):
        bad = tmp_path / "x.doc"
        bad.write_text("hi")
        run_index(enc, IndexOptions(bundle=bundle, captions=[bad], workers=0, progress=False))
