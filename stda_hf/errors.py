"""Exceptions that reach the user as one clear line."""

from __future__ import annotations

from pathlib import Path


class StdaError(Exception):
    """An error in user input or in the environment.

    The message must name the bad value (file, option, column) and say what to do. The CLI prints it as one
    line and exits with status 2; tracebacks appear only with ``--debug``.
    """


class BadImageError(StdaError):
    """A file that cannot be used as an image: missing, not an image, truncated, a decompression bomb.

    Parameters
    ----------
    path : Path or str
        The offending file.
    reason : str
        Why it was refused, in words a user understands.
    """

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
