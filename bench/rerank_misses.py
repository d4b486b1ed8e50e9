"""What the reranker's text -> image misses are on the demo corpus, by kind of confusion.

For each caption of a demo split whose own image is not ranked first after reranking
the dual encoder's top k, compare the scene of the image ranked first with the true
scene (re-planned from the corpus's ``corpus.json``) with
``training.counterfactual.scene_difference``: another number of objects, or which of
shape, size, colour, arrangement and order differ. Misses are also counted, beside the
dual encoder's, by the true scene's number of objects and by whether it holds a
colour-shape combination held out of training. A quality
measurement rather than a speed one; it lives here beside the other measurements.

Usage: .venv/bin/python bench/rerank_misses.py [--split val] [--reranker DIR] [--k 32]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.pairs import read_pairs
from xmodal.crossmodal.reranker import CrossModalReranker
from xmodal.crossmodal.threads import configure_threads
from xmodal.search.rerank import load_scorer
from xmodal.training.corpus import HELD_OUT
from xmodal.training.counterfactual import demo_images, scene_difference
from xmodal.training.rerank_eval import fusion_weight, pair_logits
from xmodal.training.rerank_features import features_for


def main() -> None:
    """Rerank every caption of the split and print the misses by kind as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs-dir", default="data/demo", help="a demo corpus folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--reranker", type=Path, help="default: the built-in model's reranker")
    ap.add_argument("--k", type=int, default=32, help="candidates reranked")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    configure_threads(args.threads)
    encoder = Encoder.load("xmodal-shapes")
    scorer = CrossModalReranker.load(args.reranker)[0] if args.reranker else load_scorer(encoder)
    if scorer is None:
        raise SystemExit("the built-in model has no reranker; pass --reranker DIR")
    pairs = read_pairs(Path(args.pairs_dir) / f"{args.split}.jsonl")
    feats, _, pairs = features_for(encoder, pairs, args.images, None, 0)
    scenes = demo_images(pairs.source, pairs.images)
    if any(s is None for s in scenes):
        raise SystemExit(f"{args.pairs_dir} is not a generated demo corpus (corpus.json)")
    sims = feats.text_emb @ feats.image_emb.T  # [M captions, N images]
    m, k = sims.shape[0], min(args.k, sims.shape[1])
    cand = np.argsort(-sims, axis=1)[:, :k]  # [M, k]
    logits = pair_logits(scorer, feats, np.repeat(np.arange(m), k), cand.ravel()).reshape(m, k)
    fused = logits + fusion_weight(scorer) * np.take_along_axis(sims, cand, axis=1)
    top = cand[np.arange(m), fused.argmax(axis=1)]
    truth = feats.caption_image  # [M] each caption's image
    missed = top != truth
    misses = np.flatnonzero(missed)
    kinds = Counter(
        " ".join(scene_difference(scenes[truth[q]].scene, scenes[top[q]].scene)) or "none"
        for q in misses
    )
    dual_missed = cand[:, 0] != truth

    def tally(rows: np.ndarray) -> dict[str, int]:
        return {
            "captions": int(rows.sum()),
            "misses": int((missed & rows).sum()),
            "dual_misses": int((dual_missed & rows).sum()),
        }

    objects = np.array([len(s.scene.objects) for s in scenes])[truth]
    unseen = np.array([bool(s.scene.combos() & HELD_OUT) for s in scenes])[truth]
    involving = Counter(
        word for kind, n in kinds.items() for word in kind.split() for _ in range(n)
    )
    print(
        json.dumps(
            {
                "split": args.split,
                "captions": int(m),
                "k": k,
                "R@1": round(1 - len(misses) / m, 4),
                "misses": len(misses),
                "by_confusion": dict(kinds.most_common()),
                "misses_involving": dict(involving.most_common()),
                "by_objects": {int(n): tally(objects == n) for n in np.unique(objects)},
                "held_out_combination": tally(unseen),
                "examples": [
                    [
                        pairs.captions[q],
                        pairs.captions[np.flatnonzero(feats.caption_image == top[q])[0]],
                    ]
                    for q in misses[:5]
                ],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
