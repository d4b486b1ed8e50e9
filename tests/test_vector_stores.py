"""One scenario over the three vector stores: FAISS files, Milvus Lite, pgvector.

A 30-image demo folder with captions is indexed into each store; searches (raw, filtered,
and through the search engine with its reranker) must equal exact FAISS search over the
catalog's vectors; verify is clean after index / modify / delete / rename+copy runs; a
store that is down is one line naming it (no password), and loses no catalog row.

Milvus Lite comes with ``pip install milvus-lite`` (dev extra); PostgreSQL with pgvector
from XMODAL_TEST_PGVECTOR_URL, or else the ``pgserver`` package (a bundled server).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from image_fixtures import scene
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from xmodal.indexer.bundle import Bundle, read_manifest
from xmodal.indexer.catalog import INDEXED, ImageRow, open_engine, sqlite_url
from xmodal.indexer.filters import ImageFilter
from xmodal.indexer.pipeline import IndexOptions, run_index
from xmodal.indexer.publish import stored_vectors
from xmodal.indexer.stores import StoreError, kind_store_url, open_store, public_store_url
from xmodal.indexer.verify import verify_bundle

from xmodal.cli import main

STORES = ("faiss", "milvus", "pgvector")
QUERIES = ("a red circle", "two blue squares on the left", "a small green triangle")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 demo scenes and their captions."""
    from xmodal.training.corpus import CorpusSpec, write_corpus

    root = tmp_path_factory.mktemp("store-corpus")
    spec = CorpusSpec(
        seed=5, train_size=1, val_size=1, test_size=30, test_shifted_size=0, style="flat"
    )
    write_corpus(root, spec, progress=False)
    return root


@pytest.fixture(scope="module")
def pgvector_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PostgreSQL URL with the vector extension available (the server lives for the
    module); skips, saying why, where none can start."""
    url = os.environ.get("XMODAL_TEST_PGVECTOR_URL")
    if url:
        return url
    try:
        import pgserver
    except ImportError:
        pytest.skip("no pgvector server: set XMODAL_TEST_PGVECTOR_URL or pip install pgserver")
    folder = tmp_path_factory.mktemp("pgserver")
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")
    except Exception as exc:  # pgserver raises its own on a failed start
        pytest.skip(f"pgserver could not start PostgreSQL: {exc}")
    return server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


def _store_url(which: str, tmp_path: Path, request: pytest.FixtureRequest) -> str | None:
    if which == "faiss":
        return None
    if which == "milvus":
        pytest.importorskip("milvus_lite", reason="Milvus Lite is not installed (dev extra)")
        return f"milvus-lite://{tmp_path}/milvus.db/photos"
    base = request.getfixturevalue("pgvector_base")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}table=t{uuid.uuid4().hex[:10]}"


def _index(encoder, bundle: Path, folder: Path, captions: Path | None, store: str | None):
    return run_index(
        encoder,
        IndexOptions(
            bundle=bundle,
            roots=[folder],
            captions=[captions] if captions else [],
            workers=0,
            progress=False,
            vector_store=store,
        ),
    )


def _exact(bundle: Path, kind: str, queries: np.ndarray, k: int, allowed=None):
    """Exact FAISS search over the catalog's live vectors: the reference."""
    engine = open_engine(sqlite_url(bundle / "catalog.sqlite"), create=False)
    try:
        with Session(engine) as s:
            if kind == "images":
                q = select(ImageRow.id).where(ImageRow.status == INDEXED)
            else:
                from xmodal.indexer.catalog import CaptionRow

                q = select(CaptionRow.id)
            ids = np.array(sorted(i for (i,) in s.execute(q).all()), np.int64)
        if allowed is not None:
            ids = np.intersect1d(ids, allowed)
        dim = read_manifest(bundle).dim(kind)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        index.add_with_ids(stored_vectors(engine, kind, ids, dim), ids)
        return index.search(np.ascontiguousarray(queries, np.float32), min(k, len(ids)))
    finally:
        engine.dispose()


def _check_searches(b: Bundle, bundle: Path, encoder) -> None:
    """Raw and filtered searches of both kinds equal exact FAISS search."""
    queries = encoder.encode_texts(list(QUERIES))
    for kind in ("images", "captions"):
        scores, ids = b.search(kind, queries, 10)
        want_s, want_i = _exact(bundle, kind, queries, 10)
        np.testing.assert_array_equal(ids[:, : want_i.shape[1]], want_i)
        np.testing.assert_allclose(scores[:, : want_s.shape[1]], want_s, atol=1e-4)
    everything = b.filter_ids(ImageFilter())
    allowed = everything[::3]
    _, ids = b.search("images", queries, 5, allowed)
    _, want_i = _exact(bundle, "images", queries, 5, allowed)
    np.testing.assert_array_equal(ids[:, : want_i.shape[1]], want_i)
    assert set(ids[ids >= 0].tolist()) <= set(allowed.tolist())
    # More than the collection: every id once (stores pad with -1, which readers drop).
    _, ids = b.search("images", queries[:1], 100)
    assert sorted(ids[ids >= 0].tolist()) == everything.tolist()


def _verify_clean(bundle: Path) -> None:
    report = verify_bundle(bundle)
    assert report.ok, report.problems


@pytest.mark.parametrize("which", STORES)
def test_same_results_and_clean_verify_on_every_store(
    which, corpus, default_encoder, tiny_checkpoint, tmp_path, request
):
    from xmodal.crossmodal.encoder import Encoder
    from xmodal.search.engine import ModelMismatchError, SearchEngine

    store = _store_url(which, tmp_path, request)
    folder = tmp_path / "photos"
    shutil.copytree(corpus / "images" / "test", folder)
    bundle = tmp_path / "bundle"
    report = _index(default_encoder, bundle, folder, corpus / "test.jsonl", store)
    assert report.counts["indexed"] == 30
    manifest = read_manifest(bundle)
    info = manifest.indexes["images"]
    if store is None:
        assert (
            info.store is None
            and info.file
            and "store"
            not in json.dumps(json.loads((bundle / "manifest.json").read_text())["indexes"])
        )
    else:
        assert info.file is None and "_images" in info.store
        assert info.count == 30 and manifest.indexes["captions"].store
    _verify_clean(bundle)

    with _engine(SearchEngine, bundle, default_encoder) as engine:
        _check_searches(engine.bundle, bundle, default_encoder)
        plain = engine.text_to_images(QUERIES[0], k=5, rerank=False)
        _, want = _exact(bundle, "images", default_encoder.encode_texts([QUERIES[0]]), 5)
        assert [r.id for r in plain] == want[0].tolist()
        reranked = engine.text_to_images(QUERIES[0], k=5, rerank_k=10)
        _, top = _exact(bundle, "images", default_encoder.encode_texts([QUERIES[0]]), 10)
        assert len(reranked) == 5 and {r.id for r in reranked} <= set(top[0].tolist())

    # Modify one file in place, delete one, then rename one and copy another.
    files = sorted(folder.iterdir())
    scene(seed=99).save(files[0], format="PNG")
    _index(default_encoder, bundle, folder, None, None)
    _verify_clean(bundle)
    files[1].unlink()
    report = _index(default_encoder, bundle, folder, None, None)
    assert report.counts["removed"] == 1
    _verify_clean(bundle)
    files[2].rename(folder / "renamed.png")
    shutil.copy(files[3], folder / "copy.png")
    report = _index(default_encoder, bundle, folder, None, None)
    assert report.counts["renamed"] == 1 and report.counts["reused"] == 1
    _verify_clean(bundle)
    assert read_manifest(bundle).indexes["images"].store == info.store  # kept by later runs
    b = Bundle(bundle)
    try:
        _check_searches(b, bundle, default_encoder)
        assert len(b.filter_ids(ImageFilter())) == 30
    finally:
        b.close()

    # Another model's bundle is refused, whatever holds the vectors.
    tiny = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    with pytest.raises(ModelMismatchError, match="built with"):
        SearchEngine(bundle, tiny)


class _engine:
    """A SearchEngine closed on exit (it holds store connections)."""

    def __init__(self, cls, bundle: Path, encoder) -> None:
        self.engine = cls(bundle, encoder)

    def __enter__(self):
        return self.engine

    def __exit__(self, *exc) -> None:
        self.engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("which", ("milvus", "pgvector"))
def test_store_down_is_one_line_and_loses_no_row(which, corpus, default_encoder, tmp_path, request):
    port = _free_port()  # nothing listens there
    dead = (
        f"milvus://127.0.0.1:{port}/photos"
        if which == "milvus"
        else f"postgresql+psycopg://xmodal:s3cret@127.0.0.1:{port}/photos"
    )
    folder = tmp_path / "photos"
    shutil.copytree(corpus / "images" / "test", folder)
    bundle = tmp_path / "bundle"
    args = ["index", str(folder), "--bundle", str(bundle), "--vector-store", dead]
    args += ["--model", "xmodal-shapes", "--workers", "0", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: vector store"), result.output
    assert f"127.0.0.1:{port}" in lines[0] and "s3cret" not in lines[0]
    # Every file is in the catalog with its vector; nothing is published yet.
    engine = open_engine(sqlite_url(bundle / "catalog.sqlite"), create=False)
    with Session(engine) as s:
        indexed = s.execute(
            select(func.count()).where(ImageRow.status == INDEXED, ImageRow.vector.is_not(None))
        ).scalar()
    engine.dispose()
    assert indexed == 30
    assert read_manifest(bundle).indexes["images"].store is None
    # The next run, to a store that answers, publishes them all without re-encoding.
    live = _store_url(which, tmp_path, request)
    report = _index(default_encoder, bundle, folder, None, live)
    assert report.counts["unchanged"] == 30 and report.counts["indexed"] == 0
    _verify_clean(bundle)
    # The store's host stops answering: readers and verify say so in one line.
    copy = _moved_store(bundle, tmp_path, dead)
    line = _one_line_error(CliRunner().invoke(main, ["search", "a red circle", "--bundle", copy]))
    assert "vector store" in line and f"127.0.0.1:{port}" in line and "s3cret" not in line
    report = verify_bundle(Path(copy))
    assert any(f"127.0.0.1:{port}" in p and "xmodal index" in p for p in report.problems)
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}") as err:
        open_store(read_manifest(Path(copy)).indexes["images"].store or "", 8)
    assert "\n" not in str(err.value)


def _one_line_error(result) -> str:
    """The CLI failed with one message line and no traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _moved_store(bundle: Path, tmp_path: Path, dead: str) -> str:
    """A copy of the bundle whose manifest names its stores at ``dead`` (without the
    password, as manifests do): a store host that no longer answers."""
    copy = tmp_path / "moved-bundle"
    shutil.copytree(bundle, copy)
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    for kind, entry in data["indexes"].items():
        if entry.get("store"):
            entry["store"] = public_store_url(kind_store_url(dead, kind, data["bundle_id"]))
    path.write_text(json.dumps(data))
    return str(copy)


def test_store_urls_per_kind_and_without_password():
    assert kind_store_url("milvus://h:19530/photos", "images", "ab") == (
        "milvus://h:19530/photos_images"
    )
    assert kind_store_url("milvus-lite:///data/m.db", "captions", "ab12") == (
        "milvus-lite:///data/m.db/xmodal_ab12_captions"
    )
    pg = kind_store_url("postgresql+psycopg://u:pw@h/db?table=pics", "visual", "ab")
    assert pg == "postgresql+psycopg://u:pw@h/db?table=pics_visual"
    assert public_store_url(pg) == "postgresql+psycopg://u@h/db?table=pics_visual"
    assert (
        public_store_url("milvus://root:Milvus@h:19530/c_images")
        == "milvus://root@h:19530/c_images"
    )
    assert kind_store_url("faiss", "images", "ab") == "faiss"
    with pytest.raises(StoreError, match="not a valid collection"):
        kind_store_url("milvus://h:19530/bad-name", "images", "ab")
    with pytest.raises(StoreError, match="unknown vector store 'redis://u@h/0'"):
        kind_store_url("redis://u:pw@h/0", "images", "ab")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"file": "images.000001.faiss", "store": "milvus://h:1/c_images"}, "both a file"),
        ({"store": "redis://h/0"}, "unknown vector store"),
        ({"store": "faiss"}, "names no database store"),
    ],
)
def test_manifest_store_field_is_checked(entry, problem):
    from xmodal.indexer.bundle import BundleError, Manifest

    model = {"name": "m", "embed_dim": 4}
    old = Manifest.from_json(json.dumps({"model": model, "indexes": {"images": {}}}))
    assert old.indexes["images"].store is None  # manifests from before stores: FAISS
    with pytest.raises(BundleError, match=problem):
        Manifest.from_json(json.dumps({"model": model, "indexes": {"images": entry}}))
