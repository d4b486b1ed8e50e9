"""Reaching a Ray cluster for `xmodal index --engine ray`: start one on this machine, or
connect to a running one, with a one-line error when that cannot be done.

A local instance is started for the run alone: as many CPUs as the project's thread
setting (``crossmodal.threads``), every server bound to 127.0.0.1, no dashboard, a small
object store, workers' logs kept out of the terminal. Ray is imported here, on first
use, so xmodal runs without it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from xmodal.crossmodal.errors import XmodalError

from .options import RAY_LOCAL

RAY_EXTRA_HINT = "pip install 'xmodal[ray]'"
OBJECT_STORE_BYTES = 300 * 1024 * 1024  # a local instance's shared memory for batches
CONNECT_TIMEOUT_S = 5.0  # a head that does not answer a TCP connect in this is unreachable
# Ray binds its servers to the node's address; this (read when Ray is imported) makes that
# 127.0.0.1 on Linux, as it is on macOS: a local instance is not reachable from outside.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayEngineError(XmodalError):
    """Ray is missing, the cluster cannot be reached, or the Ray pipeline failed."""


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a RayEngineError saying how to install it."""
    try:
        import ray
        import ray.data  # the pipeline needs it; ray[data] brings pyarrow
    except ImportError as exc:
        raise RayEngineError(
            f"--engine ray needs Ray Data ({exc.name or exc} is not installed): {RAY_EXTRA_HINT}"
        ) from None
    return ray


def _bind_loopback() -> None:
    """Make a Ray instance started from here bind to 127.0.0.1 (see ``_LOOPBACK_ENV``)."""
    os.environ.setdefault(_LOOPBACK_ENV, "0")  # inherited by the raylet and its workers
    if "ray" in sys.modules:  # imported already: its constant was read from the env then
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = os.environ[_LOOPBACK_ENV] not in ("0", "false")


def _probe(address: str) -> None:
    """Refuse at once a head that does not accept connections (Ray itself retries for
    about a minute, printing warnings)."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayEngineError(
            f"--ray-address {address!r} is not auto, local, HOST:PORT or ray://HOST:PORT"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayEngineError(
            f"Ray cluster at {address} is not reachable ({exc.strerror or exc}); start it "
            "(`ray start --head`) or pass --ray-address local"
        ) from None


def check_address(address: str) -> None:
    """Refuse, with a one-line RayEngineError, an address that is malformed or a head that
    does not answer; ``local`` and ``auto`` are checked when Ray starts or connects."""
    if address not in (RAY_LOCAL, "auto"):
        _probe(address)


def start_local_ray(num_cpus: int, num_gpus: int | None = None) -> Any:
    """Start a Ray instance in this process for this machine (see the module docstring)."""
    _bind_loopback()
    ray = import_ray()
    try:
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except Exception as exc:  # e.g. no room for the object store in /dev/shm
        raise RayEngineError(f"cannot start a local Ray instance: {exc}") from None
    return ray


def connect(address: str, num_cpus: int) -> tuple[Any, bool]:
    """Ray connected as ``address`` says; True when this call connected (and so the caller
    disconnects at the end), False when this process was connected already."""
    ray = import_ray()
    if ray.is_initialized():  # a library user's own connection (a notebook, a test)
        return ray, False
    if address == RAY_LOCAL:
        return start_local_ray(num_cpus), True
    check_address(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayEngineError(f"cannot connect to Ray at {address}: {exc}") from None
    return ray, True


def quiet_ray_data(ray: Any) -> Any:
    """Ray Data's context for our pipelines: results in input order (the same catalog ids
    as a local run), no progress bars of its own (the run has one), warnings only."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ctx
