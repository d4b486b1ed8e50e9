"""The project's exceptions: ``XmodalError`` is the root of every error xmodal raises on
purpose, so that a caller (the CLI, the web app) catches one class and shows its message;
each subclass names the thing that is wrong, not torch's or a driver's internals.

The model layer's own errors live here (the lowest layer); the other layers define theirs
beside the code that raises them (``indexer.bundle.BundleError``, ``search.engine.
QueryError``, ...), all derived from ``XmodalError``.
"""

from __future__ import annotations


class XmodalError(Exception):
    """Base class of every error xmodal raises on purpose; its message is for people."""


class ModelError(XmodalError):
    """Base class: a model could not be created, loaded or used."""


class UnknownModelError(ModelError):
    """The model name is neither an open_clip config nor one of ours."""


class CheckpointError(ModelError):
    """A weights file is missing, unreadable or corrupt."""


class ConfigMismatchError(ModelError):
    """The weights do not fit the model config (missing, unexpected or mis-shaped tensors)."""


class PretrainedUnavailableError(ModelError):
    """A pretrained tag could not be fetched (no network, or an unknown tag)."""


class WeightsIntegrityError(ModelError):
    """A packaged weights file's sha256 differs from the one this project pinned."""


# Also a ValueError: callers of the caption and pairs readers catch it as one.
class DataError(XmodalError, ValueError):
    """A pairs file, caption file or corpus is malformed; the message names file and line."""
