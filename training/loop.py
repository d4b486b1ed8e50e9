"""What the training loops share: seeding every generator, the learning-rate schedule."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (a run's own
    ``np.random.default_rng(seed)`` is separate)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(
    step: int, lr: float, total: int, warmup: int, decay_from_start: bool = False
) -> float:
    """Learning rate at ``step`` (0-based) of ``total``: linear warmup over ``warmup``
    steps, cosine decay to 0.

    Two forms, because each training command's seeded runs must keep reproducing its
    shipped weights bit for bit:

    * default (``xmodal train``): ``lr * step / warmup`` during warmup (0 at step 0),
      then the cosine over the steps after warmup;
    * ``decay_from_start`` (``xmodal train-reranker``): ``lr * min(1, (step+1)/warmup)``
      times a cosine over the whole run, which has begun to decay during warmup.

    The two angles are also computed in their own operation order (``pi * a / b``
    against ``pi * (a / b)``): they round differently in about a third of the steps.
    """
    if decay_from_start:
        rate = lr * min(1.0, (step + 1) / warmup)
        return rate * (0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
    if step < warmup:
        return lr * (step / warmup)
    return lr * (0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
