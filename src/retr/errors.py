"""One exception family for everything a user can get wrong.

The CLI catches :class:`RetrError` and prints its message on one line (no traceback), so every
message must say what is wrong, where (file, line, column, key) and how to fix it.
"""

from __future__ import annotations


class RetrError(Exception):
    """Base class of user-facing errors; ``exit_code`` is what the CLI returns."""

    exit_code = 2


class DataError(RetrError):
    """Malformed, missing or unusable input data."""


class ConfigError(RetrError):
    """Invalid configuration: unknown key, wrong type, value out of range."""


class RunDirError(RetrError):
    """A run directory that is missing, incomplete or corrupted."""
