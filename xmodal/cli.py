"""The ``xmodal`` command: the one entry point that reads flags and environment variables.

It decides thread counts (``--threads`` or ``XMODAL_THREADS``) before any work. Every
error xmodal raises on purpose (``XmodalError``) ends a command with one line,
"Error: ..." and exit status 1, never a traceback (``XmodalGroup``). Ctrl+C ends any
command with one line, "interrupted", and exit status 130 (what shells report for
SIGINT), never a traceback: what a run committed before it stays (the catalog commits in
batches; the next run resumes). The commands live in ``model_commands`` (corpus,
training, evaluation) and ``bundle_commands`` (index, search, info, verify, serve); what
they share, in ``options``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a command ended by Ctrl+C
INTERRUPTED_MESSAGE = "interrupted"


def _exit_while_loading(signum: int, frame: Any) -> None:
    # Ctrl+C while the command's libraries load: nothing has started, nothing to undo.
    os.write(2, f"{INTERRUPTED_MESSAGE}\n".encode())
    os._exit(EXIT_INTERRUPTED)


# Only a fresh interpreter's main thread: an embedding program (pytest, a notebook) keeps
# its own handler.
_loading_handler = (
    threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
)
if _loading_handler:
    signal.signal(signal.SIGINT, _exit_while_loading)

# The rest loads after the handler is in place (numpy, PIL, ... take a while).
import click  # noqa: E402

from xmodal.crossmodal.errors import XmodalError  # noqa: E402
from xmodal.crossmodal.threads import MAX_THREADS, THREADS_ENV  # noqa: E402  (imports no torch)

from .options import WholeNumber, printable  # noqa: E402


class XmodalGroup(click.Group):
    """A click group whose commands end on Ctrl+C with one line and exit status 130, and
    on any of our errors with its message on one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; KeyboardInterrupt becomes "interrupted" and exit 130, an
        XmodalError "Error: <its message>" and exit 1."""
        try:
            return super().invoke(ctx)
        except BaseException as exc:
            if isinstance(exc, XmodalError) and not _interrupted(exc):
                # Its message is for people, on one line (click prints "Error: ").
                raise click.ClickException(printable(str(exc))) from exc
            # A KeyboardInterrupt, or an error raised while cleaning up after one (it
            # names a consequence of the interruption, not a second problem). click
            # would print a blank line and "Aborted!" with status 1.
            if not _interrupted(exc):
                raise
            if not _close_progress_bars() and sys.stderr.isatty():
                click.echo(err=True)  # past the terminal's "^C"
            click.echo(INTERRUPTED_MESSAGE, err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt or was raised while one was handled."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        todo += [current.__cause__, current.__context__]
    return False


def _close_progress_bars() -> bool:
    """Close open tqdm bars (they would redraw after the message); whether any was open."""
    tqdm_module = sys.modules.get("tqdm")
    bars = list(getattr(tqdm_module.tqdm, "_instances", ())) if tqdm_module else []
    for bar in bars:
        bar.close()
    return bool(bars)


@click.group(cls=XmodalGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--threads",
    type=WholeNumber(1, MAX_THREADS),
    envvar=THREADS_ENV,
    default=None,
    help=f"Threads for torch and FAISS (default: all cores; env {THREADS_ENV}).",
)
@click.version_option(package_name="xmodal")
def main(threads: int | None) -> None:
    """xmodal: cross-modal search over images and captions."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from xmodal.crossmodal.threads import configure_threads

    configure_threads(threads)


def _register() -> None:
    from . import bundle_commands, calibrate_commands, model_commands

    for module in (model_commands, calibrate_commands, bundle_commands):
        for command in module.COMMANDS:
            main.add_command(command)


try:
    _register()
finally:
    if _loading_handler:  # loaded: from here on Ctrl+C unwinds (runs clean-up) as usual
        signal.signal(signal.SIGINT, signal.default_int_handler)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
