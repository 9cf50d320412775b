"""User errors: bad input that the command line reports in one line (tracebacks are for bugs).

A leaf module: imports nothing else from the package, so every module may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (a value, a file, a URL, a device); the message says which
    field or file is wrong and what is allowed. ``ewcstab`` prints it as one line and exits non-zero."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class DataError(UserError, RuntimeError):
    """A dataset is missing, unreadable or not what its name says; the message names the file or folder."""
