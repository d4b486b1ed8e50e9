"""The ``xmodal`` command: the one entry point that reads flags and environment variables.

It decides thread counts (``--threads`` or ``XMODAL_THREADS``) before any work and turns
the library's specific errors into one-line messages with a non-zero exit status. The
commands live in ``model_commands`` (corpus, training, evaluation) and
``bundle_commands`` (index, search, info, verify, serve).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from crossmodal.errors import DataError, ModelError
from crossmodal.images import ImageDecodeError


def friendly_errors(fn: Callable) -> Callable:
    """Report our errors as 'error: ...' instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ModelError, DataError, ImageDecodeError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def model_options(fn: Callable) -> Callable:
    fn = click.option(
        "--pretrained",
        default=None,
        help="Pretrained tag (e.g. laion2b_s34b_b79k), checkpoint file, or local-dir:FOLDER.",
    )(fn)
    fn = click.option(
        "--model",
        "model_name",
        default=None,
        help="open_clip model name (e.g. ViT-B-32). Default: the built-in xmodal model.",
    )(fn)
    return fn


def load_encoder(model_name: str | None, pretrained: str | None) -> Any:
    """The encoder the user asked for; a bare name without weights is refused."""
    from crossmodal.encoder import Encoder

    if model_name and not pretrained and not model_name.startswith("local-dir:"):
        raise click.UsageError(
            f"--model {model_name} needs --pretrained (a tag such as laion2b_s34b_b79k, "
            "a checkpoint file, or local-dir:FOLDER)"
        )
    return Encoder.load(model_name, pretrained)


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
