"""The runtime's seams, held by test: scorers behind one protocol, text queries as one
dataclass, verify's checks as registered functions, loading's helpers public."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.reranker import CrossModalReranker, RerankerConfig
from xmodal.crossmodal.scoring import MatchScorer, fusion_weight
from xmodal.search.engine import SearchEngine
from xmodal.search.query import TextQuery
from xmodal.web.service import SearchService

# ------------------------------------------------------------------- scorers


def _tiny_reranker() -> CrossModalReranker:
    torch.manual_seed(0)
    cfg = RerankerConfig(text_width=12, image_width=10, width=16, heads=2, fusion_weight=2)
    return CrossModalReranker(cfg).eval()


def test_the_cross_attention_reranker_is_a_match_scorer() -> None:
    model = _tiny_reranker()
    assert isinstance(model, MatchScorer)
    assert model.kind == "cross-attention" and model.needs_text_features
    assert fusion_weight(model) == 2.0 and isinstance(fusion_weight(model), float)
    model.cfg.fusion_weight = 0.5  # tuning writes the config: the scorer follows it
    assert model.fusion_weight == 0.5
    text, mask = torch.randn(3, 5, 12), torch.ones(3, 5, dtype=torch.bool)
    image = torch.randn(1, 4, 10)  # one image for every text
    with torch.inference_mode():
        expected = model(text, mask, image)
        got = model.match_scores(["a", "b", "c"], text, mask, image)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="token features"):
        model.match_scores(["a"], None, None, image)


TINY_COCA_NAME = "xmodal-shape-tiny-coca"


@pytest.fixture(scope="module")
def coca_encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    """A tiny CoCa model with seeded weights, loaded like any checkpoint file."""
    import open_clip
    from safetensors.torch import save_file
    from test_reranker import TINY_COCA
    from xmodal.crossmodal.registry import register_config

    register_config(TINY_COCA_NAME, TINY_COCA)
    torch.manual_seed(0)
    coca = open_clip.create_model(TINY_COCA_NAME)
    with torch.no_grad():
        for p in coca.parameters():  # a few CoCa tensors are left uninitialised
            if not torch.isfinite(p).all() or p.abs().max() > 1e3:
                torch.nn.init.normal_(p, std=0.02)
    weights = tmp_path_factory.mktemp("coca") / "coca.safetensors"
    save_file({k: v.contiguous() for k, v in coca.state_dict().items()}, str(weights))
    return Encoder.load(TINY_COCA_NAME, str(weights))


def test_the_coca_scorer_is_a_match_scorer(coca_encoder: Encoder) -> None:
    from PIL import Image
    from xmodal.crossmodal.coca_scorer import CocaScorer

    scorer = CocaScorer(coca_encoder, fusion_weight=3)
    assert isinstance(scorer, MatchScorer)
    assert scorer.kind == "coca" and not scorer.needs_text_features
    assert not scorer.uses_token_cache and fusion_weight(scorer) == 3.0
    x = coca_encoder.preprocess_image(Image.new("RGB", (40, 40), "red"))[None]
    _, tokens = coca_encoder.image_tokens(x)  # [1, P, W]
    texts = ["a red square", "a photo of a cat"]
    # One image is scored against every text, as if it were repeated.
    shared = scorer.match_scores(texts, None, None, tokens)
    repeated = scorer(texts, tokens.expand(2, -1, -1))
    assert shared.shape == (2,) and torch.allclose(shared, repeated)


def test_fusion_weight_is_defined_once() -> None:
    from xmodal.search import rerank
    from xmodal.training import rerank_eval

    assert rerank.fusion_weight is fusion_weight
    assert rerank_eval.fusion_weight is fusion_weight
    for module in (rerank, rerank_eval):
        source = inspect.getsource(module)
        assert "hasattr(" not in source and "getattr(" not in source


# ------------------------------------------------------------------- text queries


def test_a_text_query_is_a_frozen_dataclass(demo_bundle, default_encoder: Encoder) -> None:
    _, bundle = demo_bundle
    reranking = SearchEngine(bundle, default_encoder)
    dual = SearchEngine(bundle, default_encoder, rerank=False)
    try:
        assert reranking.reranker is not None and reranking.reranker.needs_text_features
        with_tokens = reranking.text_query("a red   circle")
        assert isinstance(with_tokens, TextQuery)
        assert with_tokens.tokens is not None and with_tokens.mask is not None
        assert with_tokens.tokens.shape[0] == with_tokens.mask.shape[0]
        plain = dual.text_query("a red circle")
        assert isinstance(plain, TextQuery) and plain.tokens is None and plain.mask is None
        # The same text tower gives the same embedding, with or without its tokens.
        np.testing.assert_allclose(with_tokens.vector, plain.vector, atol=1e-5)
        with pytest.raises(dataclasses.FrozenInstanceError):
            plain.vector = np.zeros(3)  # type: ignore[misc]
        # A precomputed query gives what the engine computes itself.
        for engine, query in ((reranking, with_tokens), (dual, plain)):
            own = engine.text_to_images("a red circle", k=5)
            given = engine.text_to_images("a red circle", k=5, query=query)
            assert [(r.id, r.score) for r in given] == [(r.id, r.score) for r in own]
    finally:
        reranking.close()
        dual.close()


def test_the_web_text_cache_holds_text_queries(demo_bundle, default_encoder: Encoder) -> None:
    _, bundle = demo_bundle
    service = SearchService(SearchEngine(bundle, default_encoder), cache_size=2)
    try:
        assert len(service.text_cache) == 0
        first = service.text_query("a red circle")
        assert isinstance(first, TextQuery) and first.tokens is not None
        assert not first.vector.flags.writeable  # shared by every request asking it
        assert service.text_query(" a  red circle ") is first  # the same normalised text
        service.text_query("a blue square")
        service.text_query("a green triangle")  # evicts the least recently used
        assert len(service.text_cache) == 2
        status = service.status()["text_cache"]
        assert status == {"size": 2, "hits": 1, "misses": 3}
    finally:
        service.engine.close()


# ------------------------------------------------------------------- verify


def test_verify_checks_are_the_registered_check_functions() -> None:
    from xmodal.indexer import verify

    functions = {
        name: fn
        for name, fn in vars(verify).items()
        if name.startswith("_check_") and inspect.isfunction(fn)
    }
    registered = [c.function for c in verify.REGISTRY]
    assert set(registered) == set(functions.values()), "a check function is not registered"
    assert len(registered) == len(set(registered))
    assert tuple(c.description for c in verify.REGISTRY) == verify.CHECKS
    assert all(fn.__doc__ for fn in registered)


# ------------------------------------------------------------------- loading helpers


def test_loading_helpers_are_public(tmp_path: Path) -> None:
    from xmodal.crossmodal.errors import ModelError
    from xmodal.crossmodal.loading import ensure_known_model, quiet_model_build

    ensure_known_model("ViT-B-32")  # an open_clip config
    ensure_known_model("xmodal-tiny")  # one of xmodal's, registered on first use
    with pytest.raises(ModelError, match="ViT-B-32"):
        ensure_known_model("ViT-B-33")  # close matches are named
    before = logging.root.manager.disable
    with quiet_model_build():
        assert logging.root.manager.disable >= logging.WARNING
    assert logging.root.manager.disable == before


def test_text_query_runs_the_text_tower_once_and_matches_encode_text(tiny_checkpoint) -> None:
    """One text-tower pass gives both the pooled embedding and the token features, and the
    pooled one is open_clip's own encode_text on the untrimmed context (a second pass
    doubled query latency; the trailing padding cut is exact under the causal mask)."""
    import torch.nn.functional as F

    encoder = Encoder.load("xmodal-tiny", str(tiny_checkpoint))
    texts = ["a red circle", "a large blue star to the left of a small green heart"]
    calls = []
    hook = encoder.model.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        emb, tokens, mask = encoder.text_tokens(texts)
    finally:
        hook.remove()
    assert len(calls) == 1
    with torch.inference_mode():
        full = encoder.tokenizer(texts)  # the whole 77-token context, padding included
        ref = F.normalize(encoder.model.encode_text(full).float(), dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(texts), ref, atol=1e-5)
    assert tokens.shape[:2] == mask.shape and mask.sum(dim=1).min() > 0
    assert encoder.trim_text and mask.shape[1] < full.shape[1]  # the padding was cut
    assert mask[1].all()  # the longest text fills the trimmed width
