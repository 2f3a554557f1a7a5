"""The user-facing error family: the CLI prints these as one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """An exception in one line for a message: its text's first line (at most 300 characters),
    or its type's name when it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class ClfsysError(Exception):
    """A mistake the user can fix (bad config, missing data, foreign bundle)."""


class ConfigError(ClfsysError):
    """A config key is unknown or has a bad value; the message names the dotted key."""


class DataError(ClfsysError):
    """Input data is missing or unusable; the message names the file or folder."""


class BundleError(ClfsysError):
    """A model bundle is missing, foreign or corrupt; the message names the path."""


class IncompleteError(ClfsysError):
    """A job ran but did not do all of its work (files unread, rows missing, trials lost).

    The CLI prints `result` as the JSON line, the message on stderr, and exits with code 1.
    """

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result
