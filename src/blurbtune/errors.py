"""Errors that blurbtune raises for bad input: one line naming the file, key or value."""


class BlurbtuneError(Exception):
    """Base class: a problem with the user's input or configuration, reported in one line."""


class DataError(BlurbtuneError):
    """A data file is missing, empty or malformed."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = path, line


class ConfigError(BlurbtuneError):
    """A configuration key has a value blurbtune cannot use."""


class DivergedError(BlurbtuneError):
    """The training loss became NaN or infinite."""
