"""Decoding a pairs file's images for a model: one loop, every failure reported.

Encoder training, reranker training and ``xmodal eval`` all read a pair set's images
through here, each with its own preprocess. An image that cannot be read or decoded is
left out and returned as an ``ImageFailure`` (path, reason), never dropped silently;
the caller reports the failures and raises when none loads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from tqdm import tqdm

from .errors import DataError
from .images import ImageDecodeError, decode_image
from .pairs import PairSet

T = TypeVar("T")
R = TypeVar("R")


class ImageFailure(NamedTuple):
    """An image left out, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def describe_failures(failures: Sequence[ImageFailure], first: int = 3) -> str:
    """ "N failed: a: why; b: why; ..." naming the ``first`` few."""
    named = "; ".join(str(f) for f in failures[:first])
    more = f"; and {len(failures) - first} more" if len(failures) > first else ""
    return f"{len(failures)} failed" + (f": {named}{more}" if failures else "")


def _in_order(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)``, run in ``workers`` threads at most a few items ahead of the
    consumer, so that decoded images do not pile up in memory while it encodes."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decode_pair_images(
    paths: Sequence[Path],
    preprocess: Callable[[Any], torch.Tensor],
    failures: list[ImageFailure],
    workers: int = 1,
    desc: str = "images",
    progress: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index, preprocess(image))`` for each path that decodes, in the paths' order;
    each that does not (unreadable, corrupt, refused) is appended to ``failures``."""

    def one(path: Path) -> torch.Tensor | ImageFailure:
        try:
            return preprocess(decode_image(path))
        except (OSError, ImageDecodeError) as exc:
            return ImageFailure(Path(path), str(exc))

    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    for i, result in enumerate(_in_order(one, paths, workers)):
        bar.update()
        if isinstance(result, ImageFailure):
            failures.append(result)
        else:
            yield i, result
    bar.close()


def load_pair_images(
    pairs: PairSet,
    preprocess: Callable[[Any], torch.Tensor],
    workers: int = 1,
    desc: str = "images",
    progress: bool = True,
) -> tuple[torch.Tensor, list[int], list[ImageFailure]]:
    """Every image of ``pairs`` at once: (stacked tensors [kept, ...], kept indices,
    failures). Raises DataError, naming the first failures, when none loads."""
    failures: list[ImageFailure] = []
    kept: list[int] = []
    tensors: list[torch.Tensor] = []
    for i, x in decode_pair_images(pairs.images, preprocess, failures, workers, desc, progress):
        kept.append(i)
        tensors.append(x)
    if not tensors:
        raise DataError(
            f"no image of {pairs.source} could be loaded ({describe_failures(failures)})"
        )
    return torch.stack(tensors), kept, failures
