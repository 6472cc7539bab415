"""Errors that are the user's to fix: the entry points print them as one ``error: ...`` line."""


class UserError(Exception):
    """A mistake in the user's input (config, files, flags); the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key and what to set."""
