"""What every xmodal command shares: model flags, loading the encoder they name, option
types, and printing untrusted text on one terminal line.

Its own module so that the command modules and ``cli`` (which registers them) import
it, not each other: ``python -m xmodal.cli`` then runs without a circular import.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from typing import Any

import click

from xmodal.crossmodal.registry import BUILTIN_MODELS, DEFAULT_MODEL, LOCAL_DIR, SHAPES_MODEL


class FiniteFloat(click.FloatRange):
    """A float option that refuses nan and inf (``FloatRange`` lets nan through: every
    comparison with nan is false), with optional bounds as ``click.FloatRange``."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The number, or a usage error naming the option and the value."""
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def _describe_range(self) -> str:
        # What --help shows beside the option; click's own reads "x<=None" when unbounded.
        return "finite" if self.min is None and self.max is None else super()._describe_range()


def env_note(ctx: click.Context | None, param: click.Parameter | None) -> str:
    """ " (from env NAME)" when the option's value came from its environment variable."""
    from click.core import ParameterSource

    if ctx is None or param is None or param.name is None or not param.envvar:
        return ""
    if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
        return ""
    return f" (from env {param.envvar})"


class WholeNumber(click.IntRange):
    """An integer option from ``min`` to ``max`` whose error says so, and names the
    environment variable when the value came from there."""

    name = "whole number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The number, or a usage error naming the value and the range."""
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(
                f"{value!r}{env_note(ctx, param)} is not a whole number from {self.min} to "
                f"{self.max}",
                param,
                ctx,
            )


# Invisible characters that reorder the text around them on a terminal.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")  # controls, lone surrogates, line breaks


def _escape(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` as one terminal line, for human output of paths and captions.

    Control characters (C0, C1, DEL), line and paragraph separators, bidi controls and
    non-UTF-8 bytes are escaped as Python writes them (``\\n``, ``\\x1b``, ``\\u2028``,
    ``\\xff``), so one result is one line and no name can rewrite the terminal. JSON
    output is unaffected (it escapes on its own).
    """
    if text.isprintable():  # the common case: nothing to escape
        return text
    return "".join(
        _escape(ch)
        if ch in _BIDI_CONTROLS or unicodedata.category(ch) in _ESCAPED_CATEGORIES
        else ch
        for ch in text
    )


def model_options(fn: Callable) -> Callable:
    """The --model and --pretrained options of the commands that load an encoder."""
    fn = click.option(
        "--pretrained",
        default=None,
        help=f"Pretrained tag (e.g. laion2b_s34b_b79k), checkpoint file, or {LOCAL_DIR}FOLDER.",
    )(fn)
    fn = click.option(
        "--model",
        "model_name",
        default=None,
        help=f"{DEFAULT_MODEL} (built-in, offline, for photos; the default), {SHAPES_MODEL} "
        "(built-in, the demo corpus's), or an open_clip model name with --pretrained "
        "(e.g. ViT-B-32).",
    )(fn)
    return fn


def load_encoder(model_name: str | None, pretrained: str | None) -> Any:
    """The encoder the user asked for; a bare name without weights is refused."""
    from xmodal.crossmodal.encoder import Encoder

    builtin = model_name in BUILTIN_MODELS
    if model_name and not pretrained and not builtin and not model_name.startswith(LOCAL_DIR):
        raise click.UsageError(
            f"--model {model_name} needs --pretrained (a tag such as laion2b_s34b_b79k, "
            f"a checkpoint file, or {LOCAL_DIR}FOLDER)"
        )
    return Encoder.load(model_name, pretrained)
