"""Exceptions that reach the user as one clear line."""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def run_reporting_errors(
    prog: str,
    action: Callable[[], object],
    debug: bool = False,
    resume: str = "re-run the same command to resume",
) -> int:
    """Run ``action`` as a command would: 0 when it returns, 2 with one line on stderr for a
    :class:`StdaError` (the traceback with ``debug``), 130 with ``resume`` advice on Ctrl-C.

    ``stda``, ``train.py`` and the benchmark script all end this way.
    """
    try:
        action()
    except StdaError as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {resume}", file=sys.stderr)
        return 130
    return 0
