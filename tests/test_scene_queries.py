"""The demo corpus's query sets: every query's relevant images are exactly the scenes it
is true of (checked from the scene structure, with the query's words parsed here), all
kinds present, bounded, deterministic; and ``xmodal eval --queries --rerank`` ranks them
as the search engine does, dual and reranked side by side."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.metrics import AP_K, ap_at_k
from xmodal.search.engine import SearchEngine
from xmodal.search.evaluate import format_table
from xmodal.training.corpus import (
    BACKGROUNDS,
    COLOR_NAMES,
    SHAPES,
    CorpusSpec,
    Obj,
    Scene,
    plan_splits,
)
from xmodal.training.queries import KINDS, QUERY_SPLITS, derive_queries, queries_file
from xmodal.training.query_eval import evaluate_queries_reranked

from xmodal.cli import main

# ------------------------------------------------------------------ the query's words

_C, _S, _B = "|".join(COLOR_NAMES), "|".join(SHAPES), "|".join(BACKGROUNDS)
_OBJ = rf"an? ({_C}) ({_S})"
PATTERNS = {
    "shape": re.compile(rf"an? ({_S})"),
    "colour_shape": re.compile(_OBJ),
    "two_objects": re.compile(rf"{_OBJ} and {_OBJ}"),
    "background": re.compile(rf"{_OBJ} on a ({_B}) background"),
    "relation": re.compile(rf"{_OBJ} (to the left of|to the right of|above|below) {_OBJ}"),
    "count": re.compile(r"(two|three) (\w+)"),
}
# relation words -> (arrangement, the first-named object comes first in reading order)
RELATION = {
    "to the left of": ("row", True),
    "to the right of": ("row", False),
    "above": ("column", True),
    "below": ("column", False),
}
PLURALS = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}


def _has(scene: Scene, colour: str, shape: str) -> bool:
    return any(o.color == colour and o.shape == shape for o in scene.objects)


def is_true(kind: str, text: str, scene: Scene) -> bool:
    """Whether the query's words hold of the scene, decided from its structure."""
    m = PATTERNS[kind].fullmatch(text)
    assert m, f"{kind} query {text!r} is not in the generator's words"
    g = m.groups()
    if kind == "shape":
        return any(o.shape == g[0] for o in scene.objects)
    if kind == "colour_shape":
        return _has(scene, *g)
    if kind == "two_objects":
        assert g[:2] != g[2:], text  # two different objects
        return _has(scene, *g[:2]) and _has(scene, *g[2:])
    if kind == "background":
        return scene.background == g[2] and _has(scene, *g[:2])
    if kind == "relation":
        arrangement, first_first = RELATION[g[2]]
        a, b = (g[0], g[1]), (g[3], g[4])
        combos = [(o.color, o.shape) for o in scene.objects]
        pairs = [(i, j) for i, x in enumerate(combos) for j, y in enumerate(combos) if i != j]
        return scene.arrangement == arrangement and any(
            combos[i] == a and combos[j] == b and (i < j) == first_first for i, j in pairs
        )
    n = {"two": 2, "three": 3}[g[0]]
    return sum(o.shape == PLURALS[g[1]] for o in scene.objects) == n


@pytest.fixture(scope="module")
def plan() -> dict[str, list[Scene]]:
    """The default val and test splits (1,000 scenes each; no rendering)."""
    return plan_splits(CorpusSpec(seed=0, train_size=10))


def _rows(plan: dict[str, list[Scene]], split: str, seed: int = 0) -> list[dict[str, Any]]:
    scenes = plan[split]
    images = [f"{split}/{i}" for i in range(len(scenes))]
    return derive_queries(scenes, images, seed, split, QUERY_SPLITS[split])


@pytest.mark.parametrize("split", ["val", "test"])
def test_relevant_images_are_exactly_the_scenes_the_query_is_true_of(
    plan: dict[str, list[Scene]], split: str
) -> None:
    scenes = plan[split]
    for row in _rows(plan, split):
        relevant = {int(p.rsplit("/", 1)[1]) for p in row["relevant"]}
        assert len(relevant) == len(row["relevant"]) >= 1
        truth = {i for i, s in enumerate(scenes) if is_true(row["kind"], row["query"], s)}
        assert relevant == truth, row["query"]  # every relevant one true, no true one missed
        text = row["query"]
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", text), text  # "an orange", "a red"


def test_the_checker_itself_tells_true_from_false() -> None:
    row = Scene("black", "row", (Obj("small", "yellow", "cross"), Obj("large", "pink", "square")))
    column = Scene("white", "column", row.objects)
    assert is_true("relation", "a yellow cross to the left of a pink square", row)
    assert is_true("relation", "a pink square to the right of a yellow cross", row)
    assert not is_true("relation", "a pink square to the left of a yellow cross", row)
    assert not is_true("relation", "a yellow cross above a pink square", row)
    assert is_true("relation", "a pink square below a yellow cross", column)
    assert is_true("background", "a pink square on a black background", row)
    assert not is_true("background", "a pink square on a white background", row)
    assert not is_true("colour_shape", "a pink cross", row)  # a binding the scene lacks
    two = Scene("gray", "row", (Obj("small", "red", "star"), Obj("large", "blue", "star")))
    assert is_true("count", "two stars", two) and not is_true("count", "three stars", two)
    assert not is_true("count", "two stars", Scene("gray", "row", (*two.objects, two.objects[0])))


def test_every_kind_is_present_bounded_and_distinct(plan: dict[str, list[Scene]]) -> None:
    for split in ("val", "test"):
        rows = _rows(plan, split)
        kinds = [row["kind"] for row in rows]
        assert set(kinds) == set(KINDS), split
        for kind in KINDS:
            assert kinds.count(kind) <= QUERY_SPLITS[split]
        assert len({row["query"] for row in rows}) == len(rows)  # no query twice
        # Several relevant images preferred: most queries of every kind but count have 2+.
        for kind in set(KINDS) - {"count"}:
            sizes = [len(r["relevant"]) for r in rows if r["kind"] == kind]
            assert min(sizes) >= 2, (split, kind)


def test_same_seed_same_queries_other_seed_others(plan: dict[str, list[Scene]]) -> None:
    assert _rows(plan, "test") == _rows(plan, "test")
    assert _rows(plan, "test") != _rows(plan, "test", seed=1)
    assert _rows(plan, "val") != _rows(plan, "test")


def test_written_query_files_name_the_split_images(small_corpus: Path) -> None:
    """The files write_corpus writes: their image paths are the pairs file's, and the
    image named test_000123 is the plan's scene 123 (as the renderer drew it)."""
    plan = plan_splits(CorpusSpec(**json.loads((small_corpus / "corpus.json").read_text())["spec"]))
    for split in ("val", "test"):
        pairs = {json.loads(line)["image"] for line in (small_corpus / f"{split}.jsonl").open()}
        rows = [json.loads(line) for line in (small_corpus / queries_file(split)).open()]
        assert rows and all(set(r) == {"query", "kind", "relevant"} for r in rows)
        for row in rows:
            assert set(row["relevant"]) <= pairs
            for path in row["relevant"]:
                index = int(re.fullmatch(rf"images/{split}/{split}_(\d+)\.png", path)[1])
                assert is_true(row["kind"], row["query"], plan[split][index]), (path, row)
    assert not (small_corpus / queries_file("train")).exists()


# ------------------------------------------------------------------ xmodal eval --rerank


def _subset(root: Path, out: Path, per_kind: int = 2) -> Path:
    """A few queries of each kind from a corpus's queries-test.jsonl, image paths made
    absolute (the file is written elsewhere): keeps the reranked runs short."""
    rows = [json.loads(line) for line in (root / queries_file("test")).open()]
    keep = [r for kind in KINDS for r in [x for x in rows if x["kind"] == kind][:per_kind]]
    for r in keep:
        r["relevant"] = [str((root / p).resolve()) for p in r["relevant"]]
    path = out / "queries.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return path


def test_eval_queries_rerank_json_gives_dual_and_reranked_by_kind(
    small_corpus: Path, tmp_path: Path
) -> None:
    queries = _subset(small_corpus, tmp_path)
    args = ["eval", "--pairs", str(small_corpus / "test.jsonl"), "--queries", str(queries)]
    args += ["--model", "xmodal-shapes", "--rerank", "--rerank-k", "8"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    q = json.loads(result.stdout)["queries"]
    assert q["count"] == len(KINDS) * 2 and q["images"] == 24 and q["ap_k"] == AP_K
    assert q["scorer"] == "reranked" and q["dual"]["scorer"] == "dual"
    assert q["rerank"]["k"] == 8 and q["rerank"]["fusion_weight"] > 0
    for block in (q, q["dual"]):
        assert list(block["by_kind"]) == list(KINDS)
        for kind, figures in block["by_kind"].items():
            assert figures["count"] == 2
            mine = [p for p in block["per_query"] if p["kind"] == kind]
            assert figures["mAP@100"] == pytest.approx(np.mean([p["AP@100"] for p in mine]))
            for key in ("mAP@100", "P@10", "nDCG@10", "R-precision", "mAP"):
                assert 0.0 <= figures[key] <= 1.0
    medians = q["rerank"]["median_match"]
    assert set(medians) == {"relevant", "irrelevant"}

    # The table xmodal eval prints without --json, from the same result (one slow run).
    lines = format_table(json.loads(result.stdout)).splitlines()
    head = next(ln for ln in lines if ln.startswith("mAP@100 "))
    assert [float(x) for x in head.split()[1:]] == pytest.approx(
        [q["dual"]["mAP@100"], q["mAP@100"]], abs=1e-3
    )
    relation = next(ln for ln in lines if ln.startswith("relation "))
    dual, reranked = relation.split()[2].split("/")
    assert float(dual) == pytest.approx(q["dual"]["by_kind"]["relation"]["mAP@100"], abs=1e-3)
    assert float(reranked) == pytest.approx(q["by_kind"]["relation"]["mAP@100"], abs=1e-3)


def test_reranked_queries_rank_as_the_search_engine_does(
    demo_bundle: tuple[Path, Path], default_encoder: Encoder, tmp_path: Path
) -> None:
    """Each query's AP@100, dual and reranked, recomputed from SearchEngine.text_to_images
    over a bundle of the same images: the evaluation ranks exactly as search does."""
    root, bundle = demo_bundle
    queries = _subset(root, tmp_path, per_kind=1)
    rerank_k = 16
    result = evaluate_queries_reranked(
        default_encoder, root / "test.jsonl", queries, rerank_k, progress=False
    )
    rows = [json.loads(line) for line in queries.open()]
    engine = SearchEngine(bundle, default_encoder)
    try:
        n = result["images"]
        for block, rerank in ((result, True), (result["dual"], False)):
            for row, figures in zip(rows, block["per_query"], strict=True):
                hits = engine.text_to_images(row["query"], k=n, rerank=rerank, rerank_k=rerank_k)
                assert len(hits) == n
                wanted = {Path(p).resolve() for p in row["relevant"]}
                ranked = [Path(h.path).resolve() in wanted for h in hits]
                assert figures["AP@100"] == pytest.approx(ap_at_k(ranked, AP_K), abs=1e-9), (
                    row["query"],
                    rerank,
                )
    finally:
        engine.close()
