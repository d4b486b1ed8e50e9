"""Indexing caption corpora: new captions get vectors (and tokens), links to images.

Exact duplicate captions collapse to one row (keyed by the normalised text's hash);
a caption is linked to an image when its ``image`` field names an indexed file,
relative to the caption file's folder or absolute.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from tqdm import tqdm
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import DataError, XmodalError

from .captions import CaptionRecord, read_caption_file
from .catalog import INDEXED, CaptionLink, CaptionRow, CaptionTokens, ImageRow, Root
from .tokens import TokenBudget, token_fields

BATCH = 512


class CaptionFileError(XmodalError):
    """A caption file cannot be read at all (unknown type, no caption column)."""


def read_corpora(
    files: list[Path], counts: Counter, problems: list[str]
) -> tuple[dict[str, CaptionRecord], list[tuple[str, Path, str]]]:
    """Distinct records by text hash, and (hash, folder, image reference) links."""
    records: dict[str, CaptionRecord] = {}
    links: list[tuple[str, Path, str]] = []
    for path in files:
        try:
            parsed = read_caption_file(path)
        except DataError as exc:
            raise CaptionFileError(str(exc)) from exc
        problems.extend(parsed.problems)
        counts["caption_rows_skipped"] += len(parsed.problems)
        for rec in parsed.records:
            counts["caption_rows"] += 1
            key = rec.text_hash
            if key in records:
                counts["caption_duplicates"] += 1
            else:
                records[key] = rec
            if rec.image:
                links.append((key, Path(path).resolve().parent, rec.image))
    return records, links


def index_captions(
    engine: Engine,
    encoder: Encoder,
    files: list[Path],
    run_id: int,
    counts: Counter,
    problems: list[str],
    budget: TokenBudget | None,
    progress: bool = True,
) -> None:
    """Add the new captions of ``files`` with vectors, then link captions to images.

    ``budget`` set means token features are cached for the reranker.
    """
    records, links = read_corpora(files, counts, problems)
    if not records:
        return
    with Session(engine) as s:
        wanted = list(records)
        existing: dict[str, int] = {}
        for i in range(0, len(wanted), 5000):
            existing.update(
                s.execute(
                    select(CaptionRow.text_hash, CaptionRow.id).where(
                        CaptionRow.text_hash.in_(wanted[i : i + 5000])
                    )
                ).all()
            )
    # Similar lengths together: less padding per batch.
    new = sorted((k for k in records if k not in existing), key=lambda k: len(records[k].text))
    counts["captions_unchanged"] += len(records) - len(new)
    bar = tqdm(total=len(new), desc="captions", unit="cap", disable=not progress)
    for i in range(0, len(new), BATCH):
        keys = new[i : i + BATCH]
        texts = [records[k].text for k in keys]
        tokens: list[np.ndarray | None] = [None] * len(keys)
        if budget is not None:
            vectors, toks, mask = encoder.text_tokens(texts)
            tokens = [t[m].half().numpy() for t, m in zip(toks, mask, strict=True)]
        else:
            vectors = encoder.encode_texts(texts)
        with Session(engine) as s, s.begin():
            for k, v, t in zip(keys, vectors, tokens, strict=True):
                rec = records[k]
                row = CaptionRow(
                    text_hash=k,
                    text=rec.text,
                    source=rec.source,
                    vector=np.ascontiguousarray(v, np.float32).tobytes(),
                    run_id=run_id,
                )
                s.add(row)
                s.flush()
                existing[k] = row.id
                if t is not None and budget is not None and budget.take(t):
                    s.add(CaptionTokens(caption_id=row.id, **token_fields(t)))
        counts["captions_indexed"] += len(keys)
        bar.update(len(keys))
    bar.close()
    link_captions(engine, links, existing, counts)


def link_captions(
    engine: Engine, links: list[tuple[str, Path, str]], caption_ids: dict[str, int], counts: Counter
) -> None:
    """Store caption -> image links whose image reference names an indexed file."""
    if not links:
        return
    with Session(engine) as s, s.begin():
        roots = {r.path: r.id for r in s.execute(select(Root)).scalars()}
        wanted: set[tuple[int, int]] = set()
        lookup: dict[bytes, int | None] = {}
        for key, base, ref in links:
            target = os.fsencode(os.path.normpath(os.path.join(base, ref)))
            if target not in lookup:
                lookup[target] = _image_id(s, roots, target)
            image_id = lookup[target]
            if image_id is None:
                counts["caption_links_unresolved"] += 1
                continue
            wanted.add((caption_ids[key], image_id))
        have = set(
            s.execute(
                select(CaptionLink.caption_id, CaptionLink.image_id).where(
                    CaptionLink.caption_id.in_({c for c, _ in wanted} or {-1})
                )
            ).all()
        )
        for cid, iid in wanted - have:
            s.add(CaptionLink(caption_id=cid, image_id=iid))
        counts["caption_links"] += len(wanted)


def _image_id(s: Session, roots: dict[bytes, int], target: bytes) -> int | None:
    for root, root_id in roots.items():
        prefix = root.rstrip(b"/") + b"/"
        if target.startswith(prefix):
            hit = s.execute(
                select(ImageRow.id).where(
                    ImageRow.root_id == root_id,
                    ImageRow.relpath == target[len(prefix) :],
                    ImageRow.status == INDEXED,
                )
            ).scalar()
            if hit is not None:
                return hit
    return None
