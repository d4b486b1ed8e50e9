"""The one place that decides how many threads torch, FAISS and image decoding use.

On a 2-core machine two pools that each take every core slow each other down by 10x
or more, so entry points call ``configure_threads`` once, before any work, with a
count from a CLI flag or ``XMODAL_THREADS`` (read by the entry point, not here).
"""

from __future__ import annotations

import contextlib
import os

# torch is imported inside the functions: the CLI reads THREADS_ENV and MAX_THREADS
# while it starts, before any heavy import (a Ctrl+C then still ends cleanly).

THREADS_ENV = "XMODAL_THREADS"
MAX_THREADS = 256

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
