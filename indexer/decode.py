"""Decoding image files in worker processes, each file under a time bound.

Each worker reads a file, hashes its bytes, decodes it safely (crossmodal.images) and
brings it to the model's input size, so the parent only converts and runs the model:
decoding overlaps inference. With a ``PixelFormat`` (the model's preprocessing split at
its uint8 pixels) workers need no torch and send small uint8 arrays, cheap to pickle;
the parent turns them into normalised float tensors. A model whose preprocessing is not
a plain resize / crop / normalise chain has its transform run in the workers instead
(float32 tensors, as before).

A worker that takes longer than the time bound on one file (a hostile or pathological
file) is killed and replaced, and that file fails with the reason; a worker that
crashes likewise. Workers ignore Ctrl-C (the parent stops them) and exit quietly when
the parent is gone.

Workers come from a fork server ('forkserver'): forking this process, whose OpenMP
pool is running, could deadlock the child, and 'spawn' would re-import everything in
every worker. A feeder thread keeps them busy while the caller encodes, so decoding
and inference overlap instead of taking turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

MAX_FILE_BYTES = 512 * 1024 * 1024  # larger files are refused before reading
# An image this many times the model's input (or more) on its short side is first
# reduced by an integer factor (a box filter, fast) to about this multiple; the
# antialiased resize that follows then reads few pixels and gives nearly the same result.
PRE_REDUCE_MARGIN = 3
# JPEG decodes at a reduced DCT scale that still covers the model's input times this:
# a photo a little larger than the input (up to about 2.4x) decodes at full size, as
# the model's own preprocessing sees it, while 1080p and larger still decode at 1/4+.
DRAFT_MARGIN = 1.2


def draft_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) to ask a reduced-scale JPEG decode for, given the model's
    (height, width) input."""
    h, w = image_size
    return (round(w * DRAFT_MARGIN), round(h * DRAFT_MARGIN))


@dataclass(frozen=True)
class PixelFormat:
    """The model's preprocessing split at its uint8 pixels.

    ``pixels`` (workers; Pillow and numpy only) resizes and center-crops an RGB image as
    the model's torchvision transform does and returns [H, W, 3] uint8; ``to_tensor``
    (the parent) makes the normalised [B, 3, H, W] float32 batch from those arrays.
    """

    resize: tuple[int, ...]  # (short side,) or (height, width), torchvision's ``Resize``
    crop: tuple[int, int] | None  # center crop (height, width)
    resample: int  # Pillow filter
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_preprocess(cls, preprocess: Any) -> PixelFormat | None:
        """The format of an open_clip eval transform (Resize, CenterCrop, RGB, ToTensor,
        Normalize); None for any other chain, which must then run as it is."""
        from torchvision.transforms.functional import pil_modes_mapping

        resize: tuple[int, ...] | None = None
        crop: tuple[int, int] | None = None
        resample = mean = std = None
        tensor = False
        for step in getattr(preprocess, "transforms", None) or [None]:
            kind = type(step).__name__
            if kind == "Resize" and resize is None and crop is None and not tensor:
                if step.max_size is not None:
                    return None
                size = step.size
                resize = (size,) if isinstance(size, int) else tuple(int(v) for v in size)
                resample = pil_modes_mapping.get(step.interpolation)
            elif kind == "CenterCrop" and crop is None and not tensor:
                crop = (int(step.size[0]), int(step.size[1]))
            elif kind == "MaybeConvertMode" and getattr(step, "mode", "RGB") == "RGB":
                pass  # decoding gives RGB already
            elif getattr(step, "__name__", None) == "_convert_to_rgb":
                pass  # older open_clip's spelling of the same
            elif kind in ("ToTensor", "MaybeToTensor") and not tensor:
                tensor = True
            elif kind == "Normalize" and tensor and mean is None:
                mean = tuple(float(v) for v in step.mean)
                std = tuple(float(v) for v in step.std)
            else:
                return None
        fixed = crop is not None or (resize is not None and len(resize) == 2)
        if not (fixed and mean is not None and len(mean) == 3 and len(std) == 3):
            return None
        if resize is not None and resample is None:
            return None
        return cls(resize or (), crop, int(resample or 0), mean, std)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the arrays ``pixels`` returns."""
        if self.crop is not None:
            return self.crop
        return (self.resize[0], self.resize[1])

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after ``Resize``, by torchvision's rule (long side truncated)."""
        if not self.resize:
            return width, height
        if len(self.resize) == 2:
            return self.resize[1], self.resize[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """RGB image -> [H, W, 3] uint8, resized and cropped as the model's transform does."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        out_w, out_h = self._resized_size(*image.size)
        # A large PNG, WebP or progressive JPEG (no reduced-scale decode): average blocks
        # of pixels first, so the bicubic resize reads a few times its output, not 100x.
        factor = min(image.width // out_w, image.height // out_h) // PRE_REDUCE_MARGIN
        if factor >= 2:
            image = image.reduce(factor)
        if image.size != (out_w, out_h):
            image = image.resize((out_w, out_h), self.resample)
        arr = np.asarray(image, dtype=np.uint8)
        if self.crop is None:
            return np.ascontiguousarray(arr)
        ch, cw = self.crop
        h, w = arr.shape[:2]
        if ch > h or cw > w:  # torchvision pads with black, then crops
            top, left = max(ch - h, 0), max(cw - w, 0)
            arr = np.pad(arr, ((top // 2, (top + 1) // 2), (left // 2, (left + 1) // 2), (0, 0)))
            h, w = arr.shape[:2]
        y, x = round((h - ch) / 2.0), round((w - cw) / 2.0)
        return np.ascontiguousarray(arr[y : y + ch, x : x + cw])

    def to_tensor(self, pixels: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """[B, H, W, 3] uint8 (or a list of [H, W, 3]) -> normalised [B, 3, H, W] float32,
        the same arithmetic as ToTensor then Normalize."""
        import torch

        batch = np.stack(pixels) if not isinstance(pixels, np.ndarray) else pixels
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


Preprocess = PixelFormat | Callable | None  # what workers apply to a decoded image


@dataclass
class Job:
    """One file to process. ``hash_only`` skips decoding (rename/touch detection)."""

    key: Any
    path: bytes
    hash_only: bool = False


@dataclass
class Decoded:
    """A worker's answer for one Job."""

    key: Any
    content_hash: str | None = None
    # [H, W, 3] uint8 from a PixelFormat, or [3, H, W] float32 from a plain transform
    pixels: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None
    # What was read: the open file's size and mtime (it may have been replaced since the
    # scan), so the catalog describes these bytes, not the ones the scan saw.
    size: int | None = None
    mtime_ns: int | None = None
    taken_ns: int | None = None  # EXIF date taken; None without one (the mtime stands in)
    unreadable: bool = False  # the OS refused to read it (permissions, I/O error)
    # The model's outputs (vectors, tokens, visual) when the engine encodes with the
    # decoding (Ray); the pixels are then not sent back.
    encoded: tuple | None = None


def content_hash(data: bytes) -> str:
    """The content hash the catalog stores (sha256 hex)."""
    return hashlib.sha256(data).hexdigest()


def process_file(job: Job, preprocess: Preprocess, draft: tuple[int, int] | None) -> Decoded:
    """Read, hash, decode and bring one file to the model's input (runs in a worker).

    ``preprocess`` is a PixelFormat (uint8 pixels), a transform (its float32 output) or
    None (decode only).
    """
    from xmodal.crossmodal.images import ImageDecodeError, decode_image

    try:
        with open(job.path, "rb") as f:
            # fstat of the open file, before reading: a file replaced or growing since
            # then is stored with facts that differ from the next scan's, so it is looked
            # at again, never taken as known with bytes we did not read.
            st = os.fstat(f.fileno())
            if st.st_size > MAX_FILE_BYTES:
                return Decoded(
                    job.key,
                    error=f"file too large ({st.st_size:,} bytes)",
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                )
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return Decoded(job.key, error=f"cannot read: {exc.strerror or exc}", unreadable=True)
    read = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = content_hash(data)
    if job.hash_only:
        return Decoded(job.key, content_hash=digest, **read)
    try:
        image, info = decode_image(data, draft=draft, with_info=True)
    except ImageDecodeError as exc:
        return Decoded(job.key, content_hash=digest, error=str(exc), **read)
    except Exception as exc:  # a decoder bug must fail one file, not the run
        return Decoded(job.key, content_hash=digest, error=f"decoder error: {exc!r}"[:300], **read)
    try:
        pixels = None
        if isinstance(preprocess, PixelFormat):
            pixels = preprocess.pixels(image)
        elif preprocess is not None:
            pixels = preprocess(image).numpy().astype(np.float32, copy=False)
    except Exception as exc:  # e.g. a resize of a degenerate image: one file fails
        return Decoded(job.key, content_hash=digest, error=f"resize error: {exc!r}"[:300], **read)
    return Decoded(
        job.key,
        content_hash=digest,
        pixels=pixels,
        width=info["width"],
        height=info["height"],
        format=info["format"],
        taken_ns=info.get("taken_ns"),
        **read,
    )


def _worker_main(conn: Connection, preprocess: Preprocess, draft: tuple | None) -> None:
    if preprocess is not None and not isinstance(preprocess, PixelFormat):
        import torch  # a plain transform runs torch ops: one thread, the model has the rest

        torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the parent handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            job = conn.recv()
            if job is None:
                return
            conn.send(process_file(job, preprocess, draft))
    except (EOFError, OSError):
        # The parent is gone (killed, or exited): nobody is left to answer, and a
        # BrokenPipeError traceback on its terminal would only confuse.
        return


class _Worker:
    def __init__(self, ctx: Any, preprocess: Preprocess, draft: tuple | None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, preprocess, draft), daemon=True)
        self.proc.start()
        child.close()
        self.job: Job | None = None
        self.started = 0.0

    def give(self, job: Job) -> None:
        self.job, self.started = job, time.monotonic()
        self.conn.send(job)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # already gone
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


class DecodePool:
    """Worker processes that turn Jobs into Decoded results, each file time-bounded.

    ``workers=0`` decodes in this process (no time bound; for tests and tiny runs).
    ``preprocess``: see ``process_file``.
    """

    def __init__(
        self,
        workers: int,
        preprocess: Preprocess,
        draft: tuple[int, int] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.n = workers
        self.preprocess = preprocess
        self.draft = draft
        self.timeout_s = timeout_s
        # forkserver: workers fork from a clean server process (no OpenMP threads to
        # deadlock on, unlike fork) that has already imported the decoding code, so
        # they start in milliseconds (spawn would re-import it in each). Torch only
        # where a plain transform runs in the workers.
        self.ctx = mp.get_context("forkserver")
        preload = ["xmodal.indexer.decode", "xmodal.crossmodal.images"]
        if preprocess is not None and not isinstance(preprocess, PixelFormat):
            preload += ["torch", "torchvision.transforms"]
        self.ctx.set_forkserver_preload(preload)
        self.workers: list[_Worker] = []
        self.killed = 0

    def __enter__(self) -> DecodePool:
        self.workers = [_Worker(self.ctx, self.preprocess, self.draft) for _ in range(self.n)]
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.killed += 1
        self.workers[self.workers.index(w)] = _Worker(self.ctx, self.preprocess, self.draft)

    def run(self, jobs: Iterable[Job], prefetch: int = 256) -> Iterator[Decoded]:
        """Results for every job, in completion order (each exactly once).

        A feeder thread keeps the workers busy and queues up to ``prefetch`` results,
        so decoding goes on while the caller runs the model on the previous batch.
        """
        if self.n == 0:
            for job in jobs:
                yield process_file(job, self.preprocess, self.draft)
            return
        results: queue.Queue = queue.Queue(maxsize=prefetch)
        done = object()
        stop = threading.Event()

        def feed() -> None:
            try:
                for result in self._dispatch(jobs, stop):
                    results.put(result)
            except BaseException as exc:  # surfaced in the caller's thread
                results.put(exc)
            results.put(done)

        feeder = threading.Thread(target=feed, name="xmodal-decode-feeder", daemon=True)
        feeder.start()
        try:
            while (item := results.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while feeder.is_alive():  # unblock a feeder waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    results.get(timeout=0.1)

    def _dispatch(self, jobs: Iterable[Job], stop: threading.Event) -> Iterator[Decoded]:
        pending = iter(jobs)
        exhausted = False
        while not stop.is_set():
            for w in self.workers:
                if w.job is None and not exhausted:
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                    else:
                        w.give(job)
            busy = [w for w in self.workers if w.job is not None]
            if not busy:
                return
            now = time.monotonic()
            deadline = min(w.started for w in busy) + self.timeout_s
            ready = wait([w.conn for w in busy], timeout=max(0.0, min(deadline - now, 1.0)))
            for w in busy:
                if w.conn in ready:
                    job = w.job
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):
                        self._replace(w)
                        yield Decoded(job.key, error="decoder crashed on this file")
                        continue
                    w.job = None
                    yield result
                elif time.monotonic() - w.started > self.timeout_s:
                    job = w.job
                    self._replace(w)
                    yield Decoded(
                        job.key, error=f"decoding took longer than {self.timeout_s:g} s; skipped"
                    )
