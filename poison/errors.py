"""Exceptions raised by the library, each carrying a message that names the fix."""

from __future__ import annotations


class PoisonError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(PoisonError, ValueError):
    """A params.yaml key is unknown, of the wrong type or out of range."""


class DataSourceError(PoisonError, FileNotFoundError):
    """A dataset source is missing or unreadable."""


class ShardError(PoisonError):
    """A shard or manifest is missing, corrupt, tampered with or unsafe."""


class CheckpointError(PoisonError):
    """A checkpoint is missing, incomplete or does not match the requested model."""


class PoisonedDatasetWarning(UserWarning):
    """A dataset opened for reading is labelled poisoned by its manifest (``open_dataset``).

    Silence it where poisoned data is expected:
    ``warnings.simplefilter("ignore", poison.errors.PoisonedDatasetWarning)``.
    """
