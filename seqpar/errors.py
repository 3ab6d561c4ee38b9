"""Exceptions shared by every seqpar layer."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and the fix.

    Subclasses ``ValueError`` so callers that validate inputs generically can catch both.
    """
