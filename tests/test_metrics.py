"""Recall against hand-worked score matrices: the several-captions rule and ties."""

from __future__ import annotations

import numpy as np
import pytest
from xmodal.crossmodal.metrics import (
    image_to_text_ranks,
    recall_at,
    retrieval_recall,
    text_to_image_ranks,
)

# 3 images; captions 0 and 1 describe image 0, caption 2 image 1, caption 3 image 2.
CAPTION_IMAGE = np.array([0, 0, 1, 2])


def test_text_to_image_ranks_count_ties_against_the_query() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # own image first: rank 0
            [0.3, 0.5, 0.3],  # image 1 above, image 2 tied: rank 2
            [0.1, 0.1, 0.0],  # image 0 tied with own image 1: rank 1
            [0.2, 0.3, 0.4],  # rank 0
        ]
    )
    ranks = text_to_image_ranks(scores, CAPTION_IMAGE)
    assert ranks.tolist() == [0, 2, 1, 0]
    assert recall_at(ranks, ks=(1, 2, 3)) == {"R@1": 0.5, "R@2": 0.75, "R@3": 1.0}


def test_image_to_text_uses_the_best_of_several_captions() -> None:
    scores = np.array(
        [
            [0.2, 0.8, 0.9, 0.1],  # own captions 0.2 and 0.8; caption 2 (0.9) is above: rank 1
            [0.5, 0.5, 0.5, 0.1],  # own caption 2 ties with two others: rank 2
            [0.1, 0.2, 0.3, 0.4],  # own caption 3 is best: rank 0
        ]
    )
    ranks = image_to_text_ranks(scores, CAPTION_IMAGE)
    assert ranks.tolist() == [1, 2, 0]
    assert recall_at(ranks, ks=(1, 2, 3)) == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})


def test_own_captions_never_count_against_each_other() -> None:
    # Image 0's two captions tie at the top: still rank 0.
    scores = np.array([[0.7, 0.7, 0.1, 0.1], [0.0, 0.0, 0.9, 0.0], [0.0, 0.0, 0.0, 0.9]])
    assert image_to_text_ranks(scores, CAPTION_IMAGE).tolist() == [0, 0, 0]


def test_image_without_captions_is_left_out() -> None:
    scores = np.array(
        [[0.9, 0.9, 0.0, 0.0], [0.0, 0.0, 0.9, 0.0], [0.0, 0.0, 0.0, 0.9], [1.0, 1.0, 1.0, 1.0]]
    )
    ranks = image_to_text_ranks(scores, CAPTION_IMAGE)
    assert ranks.tolist() == [0, 0, 0, -1]
    assert recall_at(ranks, ks=(1,)) == {"R@1": 1.0}


def test_constant_scores_give_zero_recall_at_1() -> None:
    scores = np.ones((4, 3))
    assert recall_at(text_to_image_ranks(scores, CAPTION_IMAGE), ks=(1, 3)) == {
        "R@1": 0.0,
        "R@3": 1.0,
    }
    assert recall_at(image_to_text_ranks(scores.T, CAPTION_IMAGE), ks=(1,)) == {"R@1": 0.0}


def test_embeddings_path_matches_score_matrices_in_any_chunking() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(7, 5)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    caption_image = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 6])
    texts = images[caption_image] + rng.normal(scale=0.8, size=(11, 5)).astype(np.float32)
    expected = {
        "text_to_image": recall_at(text_to_image_ranks(texts @ images.T, caption_image)),
        "image_to_text": recall_at(image_to_text_ranks(images @ texts.T, caption_image)),
    }
    for chunk in (1, 2, 3, 100):
        assert retrieval_recall(images, texts, caption_image, chunk=chunk) == expected
    # Perfectly aligned embeddings retrieve perfectly.
    perfect = retrieval_recall(images, images[caption_image], caption_image)
    assert perfect["text_to_image"]["R@1"] == 1.0
    assert perfect["image_to_text"]["R@1"] == 1.0
