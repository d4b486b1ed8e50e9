"""Query-set metrics (AP, AP@100, P@k, R-precision, nDCG@k) on hand-worked rankings,
checked against scikit-learn's, and ``xmodal eval --queries`` end to end with the tiny
model (kinds included)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import average_precision_score, ndcg_score
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.images import decode_image
from xmodal.crossmodal.metrics import (
    AP_K,
    ap_at_k,
    average_precision,
    ndcg_at_k,
    precision_at_k,
    query_set_metrics,
    r_precision,
    ranked_relevance,
)
from xmodal.crossmodal.pairs import read_pairs

from xmodal.cli import main

TINY = "xmodal-tiny"

# ------------------------------------------------------------------ hand-worked cases


def test_average_precision_by_hand() -> None:
    # Relevant at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert average_precision([1, 0, 1, 0]) == pytest.approx(5 / 6)
    # Relevant at ranks 2 and 5: (1/2 + 2/5) / 2.
    assert average_precision([0, 1, 0, 0, 1]) == pytest.approx(0.45)
    # A third relevant item never ranked (failed to load) contributes 0: (1/2 + 2/5) / 3.
    assert average_precision([0, 1, 0, 0, 1], n_relevant=3) == pytest.approx(0.3)
    # One relevant item last of four.
    assert average_precision([0, 0, 0, 1]) == pytest.approx(0.25)


def test_ap_at_k_by_hand() -> None:
    assert AP_K == 100
    # Every relevant item within the cut-off: AP@k is AP.
    assert ap_at_k([1, 0, 1, 0]) == pytest.approx(5 / 6)
    # Relevant at ranks 2, 3 and 5, cut at 3: (1/2 + 2/3) / min(3, 3).
    assert ap_at_k([0, 1, 1, 0, 1], k=3) == pytest.approx(7 / 18)
    # More relevant items than k: the top k all relevant is perfect (divided by k, not R).
    assert ap_at_k([1, 1, 0, 1], k=2) == pytest.approx(1.0)
    assert ap_at_k([1, 0, 0], k=2, n_relevant=3) == pytest.approx(0.5)  # 1 / min(3, 2)
    # A relevant item past the cut-off counts for nothing.
    assert ap_at_k([0, 0, 1], k=2) == 0.0
    # 150 relevant of 300 at every even rank: 50 in the top 100, each at precision 1/2,
    # divided by min(150, 100): 0.25 (full AP would be 0.5).
    alternating = np.arange(300) % 2 == 1
    assert ap_at_k(alternating) == pytest.approx(0.25)
    assert average_precision(alternating) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="without relevant"):
        ap_at_k([0, 0])
    with pytest.raises(ValueError, match="at least 1"):
        ap_at_k([1], k=0)


def test_ap_at_k_with_ties_counts_them_against_the_query() -> None:
    # Relevant image 0 ties with two irrelevant ones at the top: it lands third.
    ranked = ranked_relevance([0.9, 0.9, 0.9, 0.1], [True, False, False, True])
    assert ranked.tolist() == [False, False, True, True]
    assert ap_at_k(ranked, k=3) == pytest.approx((1 / 3) / 2)  # the second is past k
    assert ap_at_k(ranked) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_precision_at_k_divides_by_k() -> None:
    assert precision_at_k([1, 0, 1, 1], 2) == pytest.approx(0.5)
    assert precision_at_k([1, 0, 1, 1], 3) == pytest.approx(2 / 3)
    # Fewer candidates than k: still relevant-in-top-k / k (the standard definition).
    assert precision_at_k([1, 0, 1, 1], 10) == pytest.approx(0.3)


def test_r_precision_by_hand() -> None:
    assert r_precision([1, 0, 1, 0]) == pytest.approx(0.5)  # R = 2: one in the top 2
    assert r_precision([1, 0, 1, 0], n_relevant=3) == pytest.approx(2 / 3)  # top 3
    assert r_precision([0, 1, 1, 0]) == pytest.approx(0.5)


def test_ndcg_by_hand() -> None:
    # Relevant at ranks 2 and 4 of 2 relevant: (1/log2 3 + 1/log2 5) / (1 + 1/log2 3)
    # = (0.63093 + 0.43068) / 1.63093.
    assert ndcg_at_k([0, 1, 0, 1], 10) == pytest.approx(0.65092, abs=1e-5)
    # The cut-off: rank 3 is outside the top 2.
    assert ndcg_at_k([0, 0, 1], 2) == 0.0
    assert ndcg_at_k([0, 1], 2) == pytest.approx(0.63093, abs=1e-5)
    # The ideal ranking is cut at k too: 5 relevant, the top 2 both relevant is perfect.
    assert ndcg_at_k([1, 1, 0, 0], 2, n_relevant=5) == pytest.approx(1.0)
    # A relevant item never ranked lowers the ideal-normalised score: 1 / (1 + 1/log2 3).
    assert ndcg_at_k([1, 0, 0], 10, n_relevant=2) == pytest.approx(1 / 1.63093, abs=1e-5)


def test_no_relevant_item_retrieved_scores_zero() -> None:
    ranked = [0, 0, 0, 0]
    assert average_precision(ranked, n_relevant=2) == 0.0
    assert precision_at_k(ranked, 10) == 0.0
    assert r_precision(ranked, n_relevant=2) == 0.0
    assert ndcg_at_k(ranked, 10, n_relevant=2) == 0.0


def test_all_relevant_first_is_perfect_but_p_at_10_is_capped() -> None:
    ranked = [1, 1, 1, 0, 0]
    assert average_precision(ranked) == 1.0
    assert r_precision(ranked) == 1.0
    assert ndcg_at_k(ranked, 10) == pytest.approx(1.0)
    assert precision_at_k(ranked, 10) == pytest.approx(0.3)  # 3 relevant can fill 3 of 10


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="without relevant"):
        average_precision([0, 0])
    with pytest.raises(ValueError, match="less than"):
        ndcg_at_k([1, 1], 10, n_relevant=1)
    with pytest.raises(ValueError, match="at least 1"):
        precision_at_k([1], 0)


def test_ties_count_against_the_query() -> None:
    # Image 0 (relevant) ties with image 1: the irrelevant one is ranked first.
    ranked = ranked_relevance([0.5, 0.5, 0.9], [True, False, False])
    assert ranked.tolist() == [False, False, True]
    # A constant scorer ranks its relevant images last: AP of one relevant among 4 = 1/4.
    constant = ranked_relevance(np.ones(4), np.array([False, True, False, False]))
    assert average_precision(constant) == pytest.approx(0.25)
    # Without ties it is a plain descending sort.
    ranked = ranked_relevance([0.1, 0.7, 0.3, 0.9], [True, False, True, False])
    assert ranked.tolist() == [False, False, True, True]


def test_query_set_metrics_macro_average() -> None:
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.9, 0.1, 0.5]])
    relevant = np.array([[True, False, True, False], [True, False, False, False]])
    # Query 0 ranks [1, 0, 1, 0]: AP 5/6. Query 1 ranks images 1, 3, 2, 0: AP 1/4.
    result = query_set_metrics(scores, relevant, k=10)
    assert [q["AP"] for q in result["per_query"]] == pytest.approx([5 / 6, 0.25])
    assert result["mAP"] == pytest.approx((5 / 6 + 0.25) / 2)
    assert result["mAP@100"] == result["mAP"]  # four candidates: the cut-off changes nothing
    assert query_set_metrics(scores, relevant, ap_k=2)["mAP@2"] == pytest.approx(
        (1 / 2 + 0) / 2  # query 0: rank 1 of min(2, 2); query 1: its image is 4th
    )
    assert result["P@10"] == pytest.approx((0.2 + 0.1) / 2)
    assert result["R-precision"] == pytest.approx((0.5 + 0.0) / 2)
    ndcg1 = 1 / np.log2(5)  # relevant at rank 4, ideal DCG 1
    assert result["nDCG@10"] == pytest.approx((0.91972 + ndcg1) / 2, abs=1e-5)
    # Query 1 has a second relevant image that is not among the candidates: AP halves.
    result = query_set_metrics(scores, relevant, n_relevant=[2, 2])
    assert result["per_query"][1]["AP"] == pytest.approx(0.125)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_scikit_learn_on_random_rankings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    scores = rng.permutation(n).astype(float)  # distinct: sklearn averages ties instead
    relevant = rng.random(n) < 0.3
    relevant[rng.integers(n)] = True
    ranked = ranked_relevance(scores, relevant)
    assert average_precision(ranked) == pytest.approx(average_precision_score(relevant, scores))
    assert ap_at_k(ranked, k=n) == pytest.approx(average_precision(ranked))  # no cut at n
    for k in (1, 3, 10):
        expected = ndcg_score(relevant[None].astype(float), scores[None], k=k)
        assert ndcg_at_k(ranked, k) == pytest.approx(expected)
        top = np.argsort(-scores)[:k]
        assert precision_at_k(ranked, k) == pytest.approx(relevant[top].sum() / k)


# ------------------------------------------------------------------ xmodal eval --queries


def _tiny_args(checkpoint: Path) -> list[str]:
    return ["--model", TINY, "--pretrained", str(checkpoint)]


def _queries_file(tmp_path: Path, pairs_path: Path) -> tuple[Path, list[dict]]:
    """Queries over the small corpus's test images: images whose captions name a colour.

    Written outside the corpus folder: relevant paths are absolute, or relative to the
    queries file's folder (the second query's), as users may write either.
    """
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    queries = []
    for i, colour in enumerate(("red", "blue", "green", "yellow")):
        images = sorted({r["image"] for r in rows if f" {colour} " in f" {r['caption']} "})
        if not images:
            continue
        absolute = [str((pairs_path.parent / im).resolve()) for im in images]
        if i == 1:
            absolute = [os.path.relpath(a, tmp_path) for a in absolute]
        queries.append({"query": f"a {colour} shape", "relevant": absolute})
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in queries))
    return path, queries


def test_eval_queries_json_matches_a_recomputation(
    tiny_checkpoint: Path, small_corpus: Path, tmp_path: Path
) -> None:
    pairs_path = small_corpus / "test.jsonl"
    queries_path, queries = _queries_file(tmp_path, pairs_path)
    assert len(queries) >= 3
    result = _eval(tiny_checkpoint, pairs_path, queries_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["text_to_image"]) == {"R@1", "R@5", "R@10"}  # recall is still there
    q = doc["queries"]
    assert q["count"] == len(queries) and q["images"] == 24 and q["k"] == 10
    assert q["scorer"] == "dual" and q["unranked_relevant"] == 0
    assert [p["query"] for p in q["per_query"]] == [x["query"] for x in queries]
    assert [p["relevant"] for p in q["per_query"]] == [len(x["relevant"]) for x in queries]

    # The same figures, recomputed apart: images decoded here, AP and nDCG by scikit-learn.
    encoder = Encoder.load(TINY, str(tiny_checkpoint))
    pairs = read_pairs(pairs_path)
    image_emb = encoder.encode_images([decode_image(p) for p in pairs.images])
    text_emb = encoder.encode_texts([x["query"] for x in queries])
    scores = text_emb @ image_emb.T
    resolved = [p.resolve() for p in pairs.images]
    aps, ndcgs = [], []
    for row, x in zip(scores, queries, strict=True):
        wanted = {(tmp_path / r).resolve() for r in x["relevant"]}
        relevant = np.array([p in wanted for p in resolved])
        aps.append(average_precision_score(relevant, row))
        ndcgs.append(ndcg_score(relevant[None].astype(float), row[None], k=10))
    assert [p["AP"] for p in q["per_query"]] == pytest.approx(aps, abs=1e-4)
    assert q["mAP"] == pytest.approx(np.mean(aps), abs=1e-4)
    assert q["nDCG@10"] == pytest.approx(np.mean(ndcgs), abs=1e-4)
    assert q["ap_k"] == 100 and q["mAP@100"] == pytest.approx(q["mAP"])  # 24 images < 100
    assert "by_kind" not in q  # no query names a kind
    for key in ("mAP@100", "mAP", "P@10", "R-precision", "nDCG@10"):
        assert 0.0 <= q[key] <= 1.0

    table = _eval(tiny_checkpoint, pairs_path, queries_path)
    assert table.exit_code == 0, table.output
    for key in ("mAP@100", "mAP", "P@10", "R-precision", "nDCG@10"):
        line = next(ln for ln in table.stdout.splitlines() if ln.startswith(key + " "))
        assert float(line.split()[-1]) == pytest.approx(q[key], abs=1e-3)


def test_eval_queries_breaks_the_figures_down_by_kind(
    tiny_checkpoint: Path, small_corpus: Path, tmp_path: Path
) -> None:
    pairs_path = small_corpus / "test.jsonl"
    queries_path, queries = _queries_file(tmp_path, pairs_path)
    kinds = ["warm", "cool", "warm", None]  # the last names none: grouped as "other"
    rows = [dict(q, kind=k) if k else q for q, k in zip(queries, kinds, strict=False)]
    queries_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _eval(tiny_checkpoint, pairs_path, queries_path, "--json")
    assert result.exit_code == 0, result.output
    q = json.loads(result.stdout)["queries"]
    per = q["per_query"]
    assert [p.get("kind") for p in per] == kinds[: len(per)]
    by = q["by_kind"]
    assert list(by) == ["warm", "cool", "other"][: len(by)]
    warm = [p for p in per if p.get("kind") == "warm"]
    assert by["warm"]["count"] == len(warm) == 2
    for key in ("mAP@100", "P@10", "nDCG@10", "R-precision", "mAP"):
        figure = key.replace("mAP", "AP")
        assert by["warm"][key] == pytest.approx(np.mean([p[figure] for p in warm]))
    table = _eval(tiny_checkpoint, pairs_path, queries_path)
    assert table.exit_code == 0, table.output
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("warm "))
    assert line.split()[1] == "2"
    assert float(line.split()[2]) == pytest.approx(by["warm"]["mAP@100"], abs=1e-3)


def _eval(checkpoint: Path, pairs: Path, queries: Path, *extra: str) -> Any:
    """``xmodal eval --pairs PAIRS --queries QUERIES`` with the tiny model, in process."""
    return CliRunner().invoke(
        main,
        ["eval", "--pairs", str(pairs), "--queries", str(queries), *_tiny_args(checkpoint), *extra],
    )


def _eval_error(checkpoint: Path, pairs: Path, queries: Path) -> str:
    result = _eval(checkpoint, pairs, queries)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_relevant_image_not_in_the_pairs_file_is_named(
    tiny_checkpoint: Path, small_corpus: Path, tmp_path: Path
) -> None:
    pairs_path = small_corpus / "test.jsonl"
    first = str((small_corpus / json.loads(pairs_path.open().readline())["image"]).resolve())
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        json.dumps({"query": "a shape", "relevant": [first]})
        + "\n"
        + json.dumps({"query": "x", "relevant": [first, "nope/one.png", "nope/two.png"]})
        + "\n"
    )
    message = _eval_error(tiny_checkpoint, pairs_path, queries)
    assert f"{queries}:2:" in message and "'nope/one.png'" in message
    assert "two.png" not in message  # the first one only


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "not JSON"),
        ('["a list"]', "not a JSON object"),
        ('{"relevant": ["a.png"]}', "missing 'query'"),
        ('{"query": "x", "relevant": []}', "missing 'relevant'"),
        ('{"query": "x", "relevant": [3]}', "not an image path"),
        ('{"query": "x", "relevant": ["a.png"], "kind": 3}', "'kind' is not"),
    ],
)
def test_queries_file_errors_name_file_and_line(
    tiny_checkpoint: Path, small_corpus: Path, tmp_path: Path, line: str, says: str
) -> None:
    pairs_path = small_corpus / "test.jsonl"
    first = str((small_corpus / json.loads(pairs_path.open().readline())["image"]).resolve())
    queries = tmp_path / "q.jsonl"
    good = json.dumps({"query": "x", "relevant": [first]})
    queries.write_text(f"{good}\n\n{line}\n")  # a blank line 2: line numbers still count it
    message = _eval_error(tiny_checkpoint, pairs_path, queries)
    assert f"{queries}:3: " in message and says in message
