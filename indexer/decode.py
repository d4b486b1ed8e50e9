"""Decoding image files in worker processes, each file under a time bound.

Each worker reads a file, hashes its bytes, decodes it safely (crossmodal.images) and
applies the model's preprocessing, so the parent only runs the model: decoding
overlaps inference. A worker that takes longer than the time bound on one file (a
hostile or pathological file) is killed and replaced, and that file fails with the
reason; a worker that crashes likewise. Workers use one torch thread each, ignore
Ctrl-C (the parent stops them) and exit quietly when the parent is gone.

Workers come from a fork server ('forkserver'): forking this process, whose OpenMP
pool is running, could deadlock the child, and 'spawn' would re-import torch in
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

MAX_FILE_BYTES = 512 * 1024 * 1024  # larger files are refused before reading


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
    pixels: np.ndarray | None = None  # [3, H, W] float32, preprocessed
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None
    # What was read: the open file's size and mtime (it may have been replaced since the
    # scan), so the catalog describes these bytes, not the ones the scan saw.
    size: int | None = None
    mtime_ns: int | None = None
    unreadable: bool = False  # the OS refused to read it (permissions, I/O error)


def content_hash(data: bytes) -> str:
    """The content hash the catalog stores (sha256 hex)."""
    return hashlib.sha256(data).hexdigest()


def process_file(job: Job, preprocess: Callable | None, draft: tuple[int, int] | None) -> Decoded:
    """Read, hash, decode and preprocess one file (runs in a worker)."""
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
    pixels = None
    if preprocess is not None:
        pixels = preprocess(image).numpy().astype(np.float32, copy=False)
    return Decoded(
        job.key,
        content_hash=digest,
        pixels=pixels,
        width=info["width"],
        height=info["height"],
        format=info["format"],
        **read,
    )


def _worker_main(conn: Connection, preprocess: Callable | None, draft: tuple | None) -> None:
    import torch

    torch.set_num_threads(1)  # the parent's model owns the other cores
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
    def __init__(self, ctx: Any, preprocess: Callable | None, draft: tuple | None) -> None:
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
    """

    def __init__(
        self,
        workers: int,
        preprocess: Callable | None,
        draft: tuple[int, int] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.n = workers
        self.preprocess = preprocess
        self.draft = draft
        self.timeout_s = timeout_s
        # forkserver: workers fork from a clean server process (no OpenMP threads to
        # deadlock on, unlike fork) that has already imported the decoding code, so
        # they start in milliseconds instead of re-importing torch (spawn).
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(
            ["xmodal.indexer.decode", "torch", "torchvision.transforms"]
        )
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
