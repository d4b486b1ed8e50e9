"""The ``xmodal`` command: the one entry point that reads flags and environment variables.

It decides thread counts (``--threads`` or ``XMODAL_THREADS``) before any work; its
commands turn the library's specific errors into one-line messages with a non-zero exit
status (``options.friendly_errors``). The commands live in ``model_commands`` (corpus,
training, evaluation) and ``bundle_commands`` (index, search, info, verify, serve); what
they share, in ``options``.
"""

from __future__ import annotations

import os
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=lambda: int(os.environ["XMODAL_THREADS"]) if os.environ.get("XMODAL_THREADS") else None,
    help="Threads for torch and FAISS (default: all cores; env XMODAL_THREADS).",
)
@click.version_option(package_name="xmodal")
def main(threads: int | None) -> None:
    """xmodal: cross-modal search over images and captions."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from crossmodal.threads import configure_threads

    configure_threads(threads)


def _register() -> None:
    from . import bundle_commands, model_commands

    for module in (model_commands, bundle_commands):
        for command in module.COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
