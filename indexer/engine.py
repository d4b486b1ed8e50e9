"""Where images are decoded and encoded during a run: the seam between the indexer's
driver logic (scan, compare, triage, commit) and the compute behind it.

An engine turns Jobs into Decoded results (``run``) and batches of decoded images into
the model's outputs (``submit``, whose ``result()`` gives joint vectors, token features
or None, visual vectors or None). The driver routes every result and commits every batch
the same way whichever engine computed it, so ids, statuses and reasons do not depend on
the engine.

- ``LocalEngine``: decode worker processes (``decode.DecodePool``) and the inference
  streams of this process (``crossmodal.threads``).
- ``indexer.ray_engine.RayEngine``: a Ray Data pipeline (decode tasks, an actor pool of
  encoders); it encodes with the decoding, so ``submit`` only gathers what came back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.threads import InferenceStreams, inference_streams

from .decode import Decoded, DecodePool, Job, PixelFormat, draft_size
from .options import IndexOptions

Outputs = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]  # vectors, tokens, visual


class Pending(Protocol):
    """A submitted batch: ``result`` waits for its outputs."""

    def result(self) -> tuple[Any, ...]: ...


class ImageEngine(Protocol):
    """What the indexer needs of an engine (see the module docstring)."""

    replaced: int  # decode workers killed and replaced (timeouts, crashes)

    def __enter__(self) -> ImageEngine: ...

    def __exit__(self, *exc: object) -> None: ...

    def run(self, jobs: Sequence[Job]) -> Iterator[Decoded]: ...

    def submit(self, decoded: Sequence[Decoded]) -> Pending: ...


def encode_pass(
    encoder: Encoder,
    pixel_format: PixelFormat | None,
    decoded: Sequence[Decoded],
    with_tokens: bool,
) -> Outputs:
    """Pixels -> (joint vectors, token features as float16 or None, visual vectors or None).

    One function for every engine, so a Ray actor computes what a local run does.
    """
    arrays = [d.pixels for d in decoded]
    if pixel_format is not None:
        pixels = pixel_format.to_tensor(arrays)
    else:
        pixels = torch.from_numpy(np.stack(arrays))
    tokens = visual = None
    if with_tokens:
        vectors, toks = encoder.image_tokens(pixels)
        tokens = toks.half().cpu().numpy()
        if encoder.visual_dim:  # a second pass; no built-in model has both
            visual = encoder.encode_image_spaces(pixels)[1]
    else:
        vectors, visual = encoder.encode_image_spaces(pixels)
    return vectors, tokens, visual


class LocalEngine:
    """Decode worker processes and inference streams on this machine, started at the first
    batch of work (a run with nothing to decode starts nothing)."""

    def __init__(self, encoder: Encoder, opts: IndexOptions, with_tokens: bool) -> None:
        self.encoder = encoder
        self.opts = opts
        self.with_tokens = with_tokens
        self.pixel_format = PixelFormat.from_preprocess(encoder.preprocess)
        self.replaced = 0
        self._stack = contextlib.ExitStack()
        self._pool: DecodePool | None = None
        self._streams: InferenceStreams | None = None

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self._pool is not None:
            self.replaced = self._pool.killed
        self._pool = self._streams = None

    def _start(self) -> None:
        if self._pool is not None:
            return
        self._pool = self._stack.enter_context(
            DecodePool(
                self.opts.workers,
                # Only the pixel format (or the transform) travels to the workers.
                self.pixel_format or self.encoder.preprocess,
                draft=draft_size(self.encoder.image_size),
                timeout_s=self.opts.timeout_s,
            )
        )
        self._streams = self._stack.enter_context(inference_streams())

    def run(self, jobs: Sequence[Job]) -> Iterator[Decoded]:
        """Results for every job, in completion order."""
        if not jobs:
            return
        self._start()
        assert self._pool is not None
        yield from self._pool.run(jobs)

    def submit(self, decoded: Sequence[Decoded]) -> Pending:
        """Encode a batch in passes on the streams (while the caller commits the last)."""
        self._start()
        assert self._streams is not None
        return self._streams.submit(self._pass, list(decoded), self.encoder.pass_size)

    def _pass(self, decoded: Sequence[Decoded]) -> Outputs:
        return encode_pass(self.encoder, self.pixel_format, decoded, self.with_tokens)
