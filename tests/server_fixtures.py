"""A real `xmodal serve` subprocess for the tests that need the production server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(bundle: Path, *extra: str, threads: int = 2) -> Iterator[tuple[str, int]]:
    """A real `xmodal serve` (waitress) of ``bundle`` on a free loopback port, answering
    /api/health when it is yielded as (host, port); stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "xmodal", "serve", "--bundle", str(bundle)]
    cmd += ["--port", str(port), "--threads", str(threads), "--max-upload-mb", "1", *extra]
    env = dict(os.environ, XMODAL_THREADS="1")
    out = subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"xmodal serve did not start: {proc.stdout.read()}")
            time.sleep(0.3)
    try:
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
