"""Match probabilities: Platt fits, ECE on hand-worked cases, labels, the calibration
file, and what search does with them (probabilities in ranking order, labels, notices)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from xmodal.crossmodal.calibration import (
    CALIBRATION_FILE,
    Calibration,
    Platt,
    expected_calibration_error,
    match_label,
    read_calibration,
)
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.errors import DataError
from xmodal.search.engine import SearchEngine
from xmodal.search.matching import find_calibration, good_match, with_probabilities
from xmodal.training.calibrate import fit_platt

from xmodal.cli import main


def test_ece_of_a_hand_worked_case() -> None:
    # Bin [0.1, 0.2): mean p 0.1, half true -> gap 0.4, weight 1/2. Bin [0.9, 1]: mean
    # p 0.95 (0.9 and exactly 1.0, which falls in the last bin), all true -> gap 0.05.
    probs = [0.1, 0.1, 0.9, 1.0]
    labels = [False, True, True, True]
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    assert expected_calibration_error([0.0, 1.0], [False, True]) == 0.0
    assert expected_calibration_error([0.3] * 10, [True] * 3 + [False] * 7) == pytest.approx(0.0)
    with pytest.raises(DataError, match="as many labels"):
        expected_calibration_error([0.5], [True, False])


def test_platt_fit_recovers_a_known_logistic() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(-3, 3, 40_000)
    truth = rng.random(scores.size) < 1 / (1 + np.exp(-(2.0 * scores - 1.0)))
    fit = fit_platt(scores, truth)
    assert fit.a == pytest.approx(2.0, rel=0.05) and fit.b == pytest.approx(-1.0, abs=0.08)
    assert expected_calibration_error(fit.many(scores), truth) < 0.01
    # Its probabilities follow the score and stay finite far out.
    assert fit(-1e6) == 0.0 and fit(1e6) == 1.0 and fit(0.0) < fit(0.5)


def test_platt_fit_refuses_what_cannot_be_calibrated() -> None:
    with pytest.raises(DataError, match="0 true"):
        fit_platt(np.arange(5.0), np.zeros(5, bool))
    with pytest.raises(DataError, match="higher scores do not mean"):
        fit_platt(np.arange(10.0), np.arange(10) < 5)  # matches at low scores
    with pytest.raises(DataError, match="slope above 0"):
        Platt(-1.0, 0.0)


def test_labels_are_bands_of_the_probability() -> None:
    assert [match_label(p) for p in (0.99, 0.5, 0.49, 0.15, 0.149, 0.0)] == [
        "match",
        "match",
        "partial",
        "partial",
        "weak",
        "weak",
    ]


def test_calibration_file_round_trips_and_bad_files_are_named(tmp_path: Path) -> None:
    cal = Calibration("ab" * 32, Platt(10.0, -5.0), Platt(0.5, 1.0), 50.0, {"queries": 3})
    path = cal.save(tmp_path / CALIBRATION_FILE)
    assert read_calibration(path) == cal
    bad = tmp_path / "bad.json"
    for text in ("{", json.dumps({"format": 1, "sha256": "x"}), json.dumps([1])):
        bad.write_text(text)
        with pytest.raises(DataError, match=r"bad\.json"):
            read_calibration(bad)


def _results(engine: SearchEngine, q: str, **kw) -> list:
    return engine.text_to_images(q, **kw)


@pytest.fixture(scope="module")
def calibrated(demo_bundle, default_encoder: Encoder, tmp_path_factory) -> SearchEngine:
    """The demo bundle with a calibration of the shapes model fitted on its own captions
    (the shipped one is fitted on the demo val split; this keeps the test self-contained)."""
    root, bundle = demo_bundle
    copy = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(bundle, copy)
    result = CliRunner().invoke(
        main,
        [
            *("calibrate", "--model", "xmodal-shapes", "--pairs", str(root / "test.jsonl")),
            *("--out", str(copy), "--max-queries", "120"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ECE cosine" in result.output and "reranked" in result.output
    return SearchEngine(copy, default_encoder)


def test_search_results_carry_probabilities_in_ranking_order(
    demo_bundle, calibrated: SearchEngine
) -> None:
    root, _ = demo_bundle
    caption = json.loads((root / "test.jsonl").read_text().splitlines()[0])["caption"]
    # 40 results past a reranked top 8: the tail's numbers stay below the head's.
    for rerank in (True, False):
        hits = _results(calibrated, caption, k=40, rerank=rerank, rerank_k=8)
        probs = [h.match_probability for h in hits]
        assert all(p is not None for p in probs)
        assert probs == sorted(probs, reverse=True)
        assert [h.match_label for h in hits] == [match_label(p) for p in probs]
        assert good_match(hits) is True, (caption, probs[:3])
    pages = [_results(calibrated, caption, k=10, offset=o, rerank_k=8) for o in (0, 10)]
    whole = _results(calibrated, caption, k=20, rerank_k=8)
    assert [h.match_probability for p in pages for h in p] == [h.match_probability for h in whole]


def test_a_query_about_nothing_indexed_is_not_a_good_match(calibrated: SearchEngine) -> None:
    hits = _results(calibrated, "a photo of a dog on the beach", k=10)
    assert good_match(hits) is False
    assert hits[0].match_label != "match"


def test_calibration_of_other_weights_or_fusion_is_not_used(
    calibrated: SearchEngine, default_encoder: Encoder, tmp_path: Path
) -> None:
    cal = calibrated.calibration
    assert cal is not None and cal.reranked is not None
    folder = calibrated.bundle.path
    assert find_calibration(folder, default_encoder, cal.fusion_weight) == cal
    # Another fusion weight: the reranked fit is dropped, the cosine one stays, and
    # reranked results then carry no number rather than numbers out of their order.
    assert find_calibration(folder, default_encoder, 7.0) == replace(cal, reranked=None)
    raw = [
        replace(h, match_probability=None, match_label=None)
        for h in _results(calibrated, "a red circle", k=5)
    ]
    assert with_probabilities(raw, replace(cal, reranked=None), reranked=True) == raw
    # Fitted on other weights: skipped (the model folder's own calibration, if any, is next).
    replace(cal, sha256="0" * 64).save(tmp_path / CALIBRATION_FILE)
    found = find_calibration(tmp_path, default_encoder, cal.fusion_weight)
    assert found is None or found.sha256 == default_encoder.identity.sha256


def test_a_query_set_beside_the_pairs_joins_the_calibration(
    small_corpus: Path, tiny_local_dir: Path, tmp_path: Path
) -> None:
    # queries-val.jsonl beside val.jsonl: its queries are calibrated too, a candidate
    # true where the query set lists it (short, partial queries get probabilities).
    from xmodal.crossmodal.pairs import read_pairs
    from xmodal.training.calibrate import candidate_samples

    enc = Encoder.load(f"local-dir:{tiny_local_dir}")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "images").symlink_to(small_corpus / "images")
    shutil.copy(small_corpus / "val.jsonl", alone / "val.jsonl")
    k = 8
    without = candidate_samples(enc, read_pairs(alone / "val.jsonl"), None, rerank_k=k)
    with_queries = candidate_samples(enc, read_pairs(small_corpus / "val.jsonl"), None, rerank_k=k)
    lines = [json.loads(x) for x in (small_corpus / "queries-val.jsonl").read_text().splitlines()]
    assert with_queries.queries == without.queries + len(lines)
    tail = with_queries.truth[len(without.truth) :].reshape(len(lines), k)
    # A query with more relevant images than k fills its top k with true ones at best.
    assert tail.sum(axis=1).max() <= k and tail.sum() > 0
    assert np.array_equal(with_queries.truth[: len(without.truth)], without.truth)
