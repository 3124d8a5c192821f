"""The project's one error for bad input: a `ConfigError` names the field (or file), the bad value
and the fix. The CLI turns it into one line on stderr and exit 2; every layer may raise it."""


class ConfigError(ValueError):
    """A config field, file or argument has a bad value; the message names it and the fix."""
