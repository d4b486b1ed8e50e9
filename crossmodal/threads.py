"""The one place that decides how many threads torch, FAISS and image decoding use.

On a 2-core machine two pools that each take every core slow each other down by 10x
or more, so entry points call ``configure_threads`` once, before any work, with a
count from a CLI flag or ``XMODAL_THREADS`` (read by the entry point, not here).

Batch inference beside other work (the indexer: decode workers and catalog writes) runs
on ``inference_streams``: as many threads as that count, each running torch on one
intra-op thread over passes of ``PASS_SIZE`` images. Independent single-thread passes
never wait on each other at OpenMP barriers, so when another process takes a core for
a moment only one pass slows down, instead of every op of a batch spread over both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# torch and numpy are imported inside the functions: the CLI reads THREADS_ENV and
# MAX_THREADS while it starts, before any heavy import (a Ctrl+C then still ends cleanly).

THREADS_ENV = "XMODAL_THREADS"
MAX_THREADS = 256
# Images per inference pass on one stream: large enough that per-op overhead is small,
# small enough that a batch splits into several passes for every stream to share.
PASS_SIZE = 16

_configured: int | None = None


def default_threads() -> int:
    """All the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(n: int | None = None) -> int:
    """Set torch intra-op threads, torch inter-op threads and FAISS OpenMP threads to ``n``.

    ``None`` means every available core. Returns the count in force. Torch refuses to
    change inter-op threads once work has run, so that part is attempted only once.
    """
    import torch

    global _configured
    n = default_threads() if n is None else max(1, int(n))
    torch.set_num_threads(n)
    if _configured is None:
        # We never run independent ops in parallel; torch refuses once work has run.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    _configured = n
    return n


def ensure_threads_configured() -> int:
    """Configure the default count unless an entry point already chose one."""
    return _configured if _configured is not None else configure_threads()


def thread_settings() -> dict[str, int | str | None]:
    """What is in force now, for benchmarks and ``xmodal info``."""
    import torch

    info: dict[str, int | str | None] = {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "cores": default_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import faiss

        info["faiss_omp"] = faiss.omp_get_max_threads()
    except ImportError:
        info["faiss_omp"] = None
    return info


def _concat(parts: list[Any]) -> Any:
    """Pass outputs of one position joined along the batch: arrays, tensors or None."""
    import numpy as np

    if all(p is None for p in parts):
        return None
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


@dataclass
class Passes:
    """One batch's passes, submitted to the streams; ``result`` waits and joins them."""

    futures: list[Future]

    def result(self) -> tuple[Any, ...]:
        """Each output of the pass function, concatenated over the passes in order."""
        parts = [f.result() for f in self.futures]
        if not parts:
            return ()
        return tuple(_concat([p[i] for p in parts]) for i in range(len(parts[0])))


class InferenceStreams:
    """Threads that run torch on one intra-op thread each (see the module docstring)."""

    def __init__(self, streams: int) -> None:
        import torch

        self.streams = streams
        self._pool = ThreadPoolExecutor(
            streams,
            thread_name_prefix="xmodal-stream",
            initializer=torch.set_num_threads,  # per thread in torch's OpenMP backend
            initargs=(1,),
        )

    def submit(
        self,
        fn: Callable[[Sequence[Any]], tuple[Any, ...]],
        items: Sequence[Any],
        pass_size: int = PASS_SIZE,
    ) -> Passes:
        """Run ``fn`` on consecutive slices of ``items`` of ``pass_size``, on the streams.

        ``fn`` returns a tuple (arrays, tensors or None); ``Passes.result`` joins them.
        """
        return Passes(
            [
                self._pool.submit(fn, items[i : i + pass_size])
                for i in range(0, len(items), max(1, pass_size))
            ]
        )

    def close(self) -> None:
        """Wait for the passes running now; drop those not started."""
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def inference_streams(streams: int | None = None) -> Iterator[InferenceStreams]:
    """Inference streams for a block, one per configured thread unless told otherwise.

    The calling thread's torch thread count is put back on the way out: the streams'
    setting must not leak into what runs after them.
    """
    import torch

    before = torch.get_num_threads()
    pool = InferenceStreams(max(1, streams or ensure_threads_configured()))
    try:
        yield pool
    finally:
        pool.close()
        torch.set_num_threads(before)
