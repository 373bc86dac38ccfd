"""User-facing errors.

Anything the user can fix (a config key, a data file, a model name) raises
`FedtuneError`; the CLI prints its message and exits non-zero, without a traceback.
Programming errors stay ordinary exceptions so that they do show a traceback.
"""

from __future__ import annotations


class FedtuneError(Exception):
    """An error caused by input the user controls, with a message that says what to fix."""


class ConfigError(FedtuneError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(FedtuneError):
    """A data file is missing, malformed, or does not fit the configured schema."""


class ModelError(FedtuneError):
    """A model name, path or file cannot be resolved or loaded."""


class UpdateRejected(FedtuneError):
    """A client update failed validation (keys, shapes, dtypes, finiteness, norm)."""
