"""Reranker training: seconds per optimisation step, each distinct image's side computed
once (what `xmodal train-reranker` does) beside a per-pair copy of every image (what it
did before), on the same steps of a demo corpus, in the same run.

    .venv/bin/python bench/rerank_train_step.py --pairs data/demo/train.jsonl --images 1024

Prints JSON: per variant the median seconds per step (forward, backward and AdamW), and
what a step holds (pairs, distinct images, caption tokens). Both variants start from the
same weights and see the same pairs; their logits agree to float rounding.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import numpy as np
import torch
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.threads import configure_threads
from xmodal.training.config import RerankTrainConfig
from xmodal.training.counterfactual import demo_images
from xmodal.training.loop import seed_all
from xmodal.training.rerank_features import training_set
from xmodal.training.rerank_partial import partial_truth_set
from xmodal.training.rerank_sampling import hard_negatives, sample_partial_step, sample_step
from xmodal.training.rerank_train import grouped_logits, itm_loss, listwise_loss, new_reranker


def timed_step(model, opt, pairs, cfg: RerankTrainConfig, share: bool) -> float:
    """Seconds of one optimisation step on ``pairs``."""
    started = time.perf_counter()
    text, mask, images, index, y = pairs.tensors()
    if share:
        logits = grouped_logits(model, text, mask, images, cfg.length_groups, index)
    else:
        logits = grouped_logits(model, text, mask, images[index], cfg.length_groups)
    loss = itm_loss(logits, y, balance=True)
    loss = loss + cfg.listwise * sum(listwise_loss(logits, c) for c in pairs.lists.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", required=True, help="a demo corpus's train.jsonl")
    ap.add_argument("--model", default="xmodal-shapes")
    ap.add_argument("--images", type=int, default=1024, help="training images prepared")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--partial-truth", action="store_true", help="partial-truth steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    configure_threads(args.threads)
    seed_all(0)
    cfg = RerankTrainConfig(pairs=args.pairs, out="", model=args.model, images=args.images)
    encoder = Encoder.load(cfg.model)
    data = training_set(encoder, cfg.pairs, cfg.images, cfg.captions_per_image, True, 0)
    negs = None
    if args.partial_truth:
        demo = demo_images(data.pairs.source, data.pairs.images)
        data.partial = partial_truth_set(encoder, data.pairs, data.caps_of, data.feats, demo, 0)
    else:
        negs = hard_negatives(data)
    rng = np.random.default_rng(0)
    n = len(data.caps_of)
    steps = []
    for _ in range(args.steps + 1):  # the first of each variant warms up
        imgs = rng.permutation(n)[: cfg.batch_size]
        if data.partial is not None:
            steps.append(sample_partial_step(data, imgs, rng))
        else:
            steps.append(sample_step(data, negs, imgs, rng))
    base = new_reranker(data.feats, cfg)
    report: dict = {"pairs": args.pairs, "partial_truth": args.partial_truth}
    _, mask, images, index, _ = steps[0].tensors()
    report["per_step"] = {
        "pairs": len(index),
        "distinct_images": len(images),
        "caption_tokens_mean": round(float(mask.sum(1).float().mean()), 1),
    }
    for share in (False, True):  # per-pair copies first: the baseline
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        times = [timed_step(model, opt, p, cfg, share) for p in steps]
        name = "distinct_images" if share else "per_pair_copies"
        report[name] = {"s_per_step_p50": round(statistics.median(times[1:]), 3)}
    report["speedup"] = round(
        report["per_pair_copies"]["s_per_step_p50"] / report["distinct_images"]["s_per_step_p50"],
        2,
    )
    report["machine"] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
