"""What every xmodal command shares: model flags, loading the encoder they name, and
turning the library's specific errors into one-line messages.

Its own module so that the command modules and ``cli`` (which registers them) import
it, not each other: ``python -m xmodal.cli`` then runs without a circular import.
"""

from __future__ import annotations

import functools
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
