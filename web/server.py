"""The app behind waitress, with limits chosen on purpose and errors in the app's own form.

waitress is asyncore-based: one thread accepts and reads every connection, request
threads run the app. Its defaults let 100 clients that send half a request line hold
every connection slot for two minutes (``connection_limit`` 100, ``channel_timeout``
120 s, checked every 30 s), during which nobody else is answered. ``xmodal serve``
passes a larger connection limit, a shorter idle timeout and a frequent check (see its
``--help``); each slot is one file descriptor, so the limit stays well below the usual
1024 per process, and ``poll`` replaces ``select`` so no descriptor number is too high.
A client that keeps trickling bytes still keeps its slot: on an untrusted network put a
reverse proxy in front (nginx: ``client_header_timeout``, ``client_body_timeout``,
``limit_conn``) and bind ``xmodal serve`` to 127.0.0.1.

The request body limit is the app's (``MAX_CONTENT_LENGTH``): waitress refuses larger
bodies itself, before buffering them. Such refusals, and waitress's other errors (a
malformed request, headers too large), are answered as the app would: JSON
``{"error", "status"}`` under ``/api``, the message naming the upload limit. A client
that sends the whole oversized body anyway (no ``Expect: 100-continue``) has it read
and discarded, for up to ``DRAIN_TIMEOUT_S``, so it gets the answer instead of a
connection reset.
"""

from __future__ import annotations

import json
import time
from typing import Any

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask
from waitress.utilities import RequestEntityTooLarge

DRAIN_TIMEOUT_S = 30.0  # how long an oversized body is read and discarded before closing


class _DrainingParser(HTTPRequestParser):
    """Reads and discards a body over the limit, then reports the 413."""

    _drain_left: int | None = None
    _drain_until: float = 0.0

    def received(self, data: bytes) -> int:
        """Consume request bytes; a refused body is counted off, never buffered."""
        if self._drain_left is not None:
            used = min(len(data), self._drain_left)
            self._drain_left -= used
            if self._drain_left == 0 or time.monotonic() > self._drain_until:
                self.completed = True
            return used
        consumed = super().received(data)
        refused = self.completed and isinstance(self.error, RequestEntityTooLarge)
        if refused and not self.chunked and self.content_length > 0:
            if self.expect_continue:
                # The client waits for "100 Continue" before the body: answer at once.
                self.expect_continue = False
            else:
                self.completed = False
                self._drain_left = self.content_length
                self._drain_until = time.monotonic() + DRAIN_TIMEOUT_S
        return consumed


class _AppErrorTask(ErrorTask):
    """waitress's own error responses, in the app's form: JSON under /api."""

    def execute(self) -> None:
        """Write the error response and close the connection."""
        error = self.request.error
        message = str(error.body)
        if isinstance(error, RequestEntityTooLarge) and self.channel.too_large:
            message = self.channel.too_large
        path = getattr(self.request, "path", "") or ""
        if path == "/api" or path.startswith("/api/"):
            body = json.dumps({"error": message, "status": error.code}).encode()
            content_type = "application/json"
        else:
            body = f"{error.reason}: {message}\n".encode()
            content_type = "text/plain; charset=utf-8"
        self.status = f"{error.code} {error.reason}"
        self.response_headers.extend(
            [("Content-Type", content_type), ("X-Content-Type-Options", "nosniff")]
        )
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _AppChannel(HTTPChannel):
    parser_class = _DrainingParser
    error_task_class = _AppErrorTask
    too_large: str | None = None  # what a 413 says (the app's message)


def make_server(
    app: Any,
    host: str,
    port: int,
    threads: int,
    connection_limit: int,
    channel_timeout_s: int,
    cleanup_interval_s: int,
) -> Any:
    """A waitress server for the Flask ``app`` (not yet running: call ``.run()``)."""
    from .api import upload_limit_message

    body_cap = app.config["MAX_CONTENT_LENGTH"]
    channel = type(
        "XmodalChannel",
        (_AppChannel,),
        {"too_large": upload_limit_message(app.config["MAX_UPLOAD_BYTES"])},
    )
    server = create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="xmodal",
        connection_limit=connection_limit,
        channel_timeout=channel_timeout_s,
        cleanup_interval=min(cleanup_interval_s, channel_timeout_s),
        asyncore_use_poll=True,
        # waitress refuses a body of max_request_body_size bytes or more; the app takes
        # up to its own cap, so both draw the line at the same byte.
        max_request_body_size=body_cap + 1,
        clear_untrusted_proxy_headers=True,
    )
    # One listener per address (MultiSocketServer.map), or the server itself (its _map).
    sockets = server.map if hasattr(server, "map") else server._map
    for listener in list(sockets.values()):
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = channel
    return server
