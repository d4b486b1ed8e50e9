"""Exceptions of the model layer: each names the thing that is wrong, not torch's internals."""

from __future__ import annotations


class ModelError(Exception):
    """Base class: a model could not be created, loaded or used."""


class UnknownModelError(ModelError):
    """The model name is neither an open_clip config nor one of ours."""


class CheckpointError(ModelError):
    """A weights file is missing, unreadable or corrupt."""


class ConfigMismatchError(ModelError):
    """The weights do not fit the model config (missing, unexpected or mis-shaped tensors)."""


class PretrainedUnavailableError(ModelError):
    """A pretrained tag could not be fetched (no network, or an unknown tag)."""


class IntegrityError(ModelError):
    """A packaged file's sha256 differs from the one this project pinned."""


class DataError(ValueError):
    """A pairs file, caption file or corpus is malformed; the message names file and line."""
