"""Errors raised when a dataset file cannot be found or fails verification."""

from __future__ import annotations

__all__ = ["CorruptDataError", "DataError", "MissingDataError"]


class DataError(RuntimeError):
    """Base class of the dataset errors; the message says which file and how to fix it."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset file is absent (and downloading it was disabled or failed)."""


class CorruptDataError(DataError, ValueError):
    """A dataset file is present but its content is not what was expected."""
