"""The project's errors of bad input: each is one ``error:`` line and exit status 2 (utils/cli.py).

Every message names the file, flag or value at fault and, where it helps, what to do. They live
here, below every other module, so that any layer can raise them and utils/cli.py and
utils/distributed.py can catch them without importing the layers that raise them.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message names it."""


class DataError(ValueError):
    """Bad input data. The message names the file(s) or value at fault."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or written by another script or architecture."""


class WriteError(OSError):
    """An output that could not be written (full disk, read-only folder...); the message names it."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, WriteError)
