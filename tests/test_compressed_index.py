"""The compressed (IVF-PQ) index chosen under a memory budget, with exact rerank (issue 21)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from xmodal.crossmodal.errors import XmodalError
from xmodal.indexer import ann, compressed
from xmodal.indexer.compressed import MemoryBudgetError


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GB", 2 << 30),
        ("512MB", 512 << 20),
        ("1.5G", int(1.5 * (1 << 30))),
        ("800k", 800 << 10),
        ("4096", 4096),
        (12345, 12345),
        (" 3 gib ", 3 << 30),
    ],
)
def test_parse_memory_reads_sizes(text, size):
    assert compressed.parse_memory(text) == size


@pytest.mark.parametrize("bad", ["", "lots", "2XB", "-1GB", "0", 0, "1.2.3G"])
def test_parse_memory_names_the_bad_value(bad):
    with pytest.raises(MemoryBudgetError) as err:
        compressed.parse_memory(bad)
    assert isinstance(err.value, XmodalError)
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)


def test_plain_index_kept_when_it_fits():
    assert compressed.choose_within_budget(10_000, 64, 1 << 30) == "IDMap2,Flat"
    assert compressed.choose_within_budget(200_000, 64, 1 << 30) == ann.choose_factory(200_000)


def test_choice_fits_the_budget():
    for n, dim, budget in [
        (20_000, 64, 2 << 20),
        (10_000_000, 256, 2 << 30),
        (2_000_000, 512, 1 << 30),
    ]:
        factory = compressed.choose_within_budget(n, dim, budget)
        assert compressed.is_compressed(factory)
        assert compressed.estimate_bytes(factory, n, dim) <= budget
        m = int(factory.rsplit("PQ", 1)[1].split("x")[0])
        assert dim % m == 0
        assert ("HNSW" in factory) == (n > compressed.HNSW_QUANTIZER_ABOVE)
    # Larger budgets give larger codes (better recall), never a worse choice.
    small = compressed.choose_within_budget(10_000_000, 256, 1 << 30)
    large = compressed.choose_within_budget(10_000_000, 256, 4 << 30)
    assert compressed.estimate_bytes(small, 10_000_000, 256) < compressed.estimate_bytes(
        large, 10_000_000, 256
    )


def test_estimate_is_conservative_against_faiss():
    """The estimate is at least the size FAISS writes for a real index."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10_000, 32)).astype(np.float32)
    faiss.normalize_L2(x)
    for factory in ("IDMap2,Flat", "IVF64,Flat", "IVF64,PQ4x8"):  # PQ training is slow
        index = ann.build(factory, 32, x)
        ann.add(index, np.arange(len(x), dtype=np.int64), x)
        written = len(faiss.serialize_index(index))
        assert compressed.estimate_bytes(factory, len(x), 32) >= written, factory


def test_impossible_budget_says_the_smallest_that_works():
    with pytest.raises(MemoryBudgetError) as err:
        compressed.choose_within_budget(10_000_000, 256, 10 << 20)
    message = str(err.value)
    assert "\n" not in message and "needs" in message and "MB" in message
    needed = float(message.rsplit("needs ", 1)[1].split(" MB")[0])
    fits = compressed.choose_within_budget(10_000_000, 256, int((needed + 1) * (1 << 20)))
    assert compressed.is_compressed(fits)


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def test_reranked_pq_search_reaches_target_recall():
    """IVF-PQ under a budget forcing it, reranked with the exact stored vectors."""
    # Small enough to keep PQ training (about 1 s per sub-quantizer here) short.
    n, dim = 12_000, 32
    x = _clustered(n, dim)
    ids = np.arange(1, n + 1, dtype=np.int64)  # catalog ids start at 1
    factory = compressed.choose_within_budget(n, dim, 600_000)
    assert factory == "IVF256,PQ8x8"
    assert compressed.is_compressed(factory)
    index = ann.build(factory, dim, x[: ann.training_size(factory, n)])
    ann.add(index, ids, x)

    def exact(wanted: np.ndarray) -> np.ndarray:
        return x[wanted - 1]

    held_out = _clustered(200, dim, seed=7)  # queries not in the collection
    nprobe, tuned = compressed.tune_reranked(index, x, ids, exact, queries=held_out)
    assert tuned >= ann.TARGET_RECALL
    faiss.extract_index_ivf(index).nprobe = nprobe

    truth = ids[np.argsort(-(held_out @ x.T), axis=1)[:, :10]]
    got = compressed.search_reranked(index, held_out, 10, exact)
    reranked = np.mean([len(set(g[1]) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    _, plain = index.search(held_out, 10)
    without = np.mean([len(set(p) & set(t)) / 10 for p, t in zip(plain, truth, strict=True)])
    assert reranked >= 0.95 and reranked > without
    assert all(len(g[1]) == 10 and (g[1] > 0).all() for g in got)  # never id -1
    # Scores are the exact inner products, best first.
    scores, found = got[0]
    assert np.allclose(scores, x[found - 1] @ held_out[0], atol=1e-5)
    assert (np.diff(scores) <= 1e-6).all()


# ------------------------------------------------------- through the indexer and the CLI


@pytest.fixture(scope="module")
def compressed_bundle(tmp_path_factory, tiny_checkpoint):
    """10,400 distinct captions through the tiny model into a bundle whose caption index
    must be compressed to fit a 500 kB budget (exact IDMap2,Flat needs about 2 MB)."""
    from xmodal.crossmodal.encoder import Encoder
    from xmodal.indexer.pipeline import IndexOptions, run_index

    root = tmp_path_factory.mktemp("compressed")
    colours = ["red", "green", "blue", "yellow", "pink", "black", "white", "grey"]
    things = ["cat", "dog", "boat", "house", "tree", "car", "bird", "horse", "cup", "chair"]
    places = ["beach", "street", "field", "kitchen", "forest", "river", "garden", "room"]
    lines = [
        f"a {c} {t} in the {p} number {i}"
        for i in range(17)
        for c in colours
        for t in things
        for p in places
    ][:10_400]
    captions = root / "captions.txt"
    captions.write_text("\n".join(lines) + "\n")
    encoder = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    bundle = root / "bundle"
    opts = IndexOptions(
        bundle=bundle, captions=[captions], progress=False, max_index_memory=500_000
    )
    report = run_index(encoder, opts)
    return encoder, bundle, captions, report


def test_a_budget_builds_a_compressed_index_reranked_exactly(compressed_bundle) -> None:
    from xmodal.indexer.bundle import Bundle, read_manifest
    from xmodal.indexer.verify import verify_bundle

    encoder, bundle, _, _ = compressed_bundle
    info = read_manifest(bundle).indexes["captions"]
    assert compressed.is_compressed(info.factory) and info.count == 10_400
    assert info.params["k_factor"] == compressed.K_FACTOR
    assert info.params["tuned_recall"] >= ann.TARGET_RECALL
    assert info.params["estimated_bytes"] <= 500_000
    assert verify_bundle(bundle).ok
    opened = Bundle(bundle)
    try:
        ids = np.array([1, 77, 5000, 10_400], np.int64)
        own = opened.vectors("captions", ids.tolist())
        scores, found = opened.search("captions", own, 10)
        assert (found[:, 0] == ids).all()  # each stored vector finds itself first
        assert np.allclose(scores[:, 0], 1.0, atol=1e-4)  # exact, not a PQ approximation
        assert (found >= 0).all() and (np.diff(scores, axis=1) <= 1e-6).all()
        # Against exact search over every stored vector.
        every = np.arange(1, 10_401)
        table = opened.vectors("captions", every.tolist())
        queries = encoder.encode_texts(["a red cat on the beach", "a blue boat", "a chair"])
        truth = every[np.argsort(-(queries @ table.T), axis=1)[:, :10]]
        _, got = opened.search("captions", queries, 10)
        recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
        assert recall >= 0.9
    finally:
        opened.close()


def test_a_later_run_keeps_the_compressed_index(compressed_bundle) -> None:
    from xmodal.indexer.bundle import read_manifest
    from xmodal.indexer.pipeline import IndexOptions, run_index

    encoder, bundle, captions, _ = compressed_bundle
    before = read_manifest(bundle)
    report = run_index(encoder, IndexOptions(bundle=bundle, captions=[captions], progress=False))
    after = read_manifest(bundle)
    assert after.indexes["captions"].factory == before.indexes["captions"].factory
    assert after.generation == before.generation  # nothing changed, nothing rewritten
    assert report.generation == before.generation


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-index-memory", "lots"], "lots"),
        (["--max-index-memory", "2GB", "--index-factory", "IVF64,Flat"], "not both"),
        (["--max-index-memory", "2GB", "--vector-store", "milvus://h:19530/c"], "FAISS"),
    ],
)
def test_the_budget_flag_refuses_what_it_cannot_do(tmp_path, extra, message) -> None:
    from click.testing import CliRunner

    from xmodal.cli import main

    (tmp_path / "c.txt").write_text("a red circle\n")
    args = ["index", "--captions", str(tmp_path / "c.txt"), "--bundle", str(tmp_path / "b")]
    result = CliRunner().invoke(main, args + extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_training_size_reads_an_hnsw_coarse_quantizer() -> None:
    # What choose_within_budget picks above a million vectors must be trainable.
    factory = compressed.choose_within_budget(10_000_000, 256, 2 << 30)
    assert "_HNSW" in factory
    assert ann.training_size(factory, 10_000_000) == 50 * int(factory[3:].split("_")[0])
