"""Exceptions that reach the user as one clear line."""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


class StdaError(Exception):
    """An error in user input or in the environment.

    The message must name the bad value (file, option, column) and say what to do. The CLI prints it as one
    line and exits with status :attr:`exit_code` (2); tracebacks appear only with ``--debug``.
    """

    exit_code = 2


class IncompleteError(StdaError):
    """A job that finished but left some of what it was asked for undone (e.g. images a fetch skipped): the
    folder is usable, a re-run may complete it. Exit status 3, so a script can tell it from bad input (2)."""

    exit_code = 3


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


ENVIRONMENT_ERRNOS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "the file name is too long",
}
"""``OSError`` numbers that describe the user's environment (where a path points), not a bug of ours."""


def environment_error(err: OSError, path: Path | str | None = None) -> StdaError | None:
    """A :class:`StdaError` naming the path and what to do for an environment ``OSError``; None for others.

    ``path`` is the file the caller was working on, used when the error does not name one.
    """
    if err.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = err.filename if err.filename is not None else path
    what = ENVIRONMENT_ERRNOS[err.errno]
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = (
            "free some space and re-run the same command: finished work is kept and only the rest is redone"
        )
    else:
        advice = "choose a path you can write to (and read from)"
    return StdaError(f"cannot use {where}: {what}; {advice}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit or preemption) as an interrupt: every clean-up a Ctrl-C
    runs (stopping child processes, keeping state to resume) runs for it too."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise :class:`Terminated` in the main thread on SIGTERM while the block runs (where SIGTERM would kill the
    process outright: its default handler, in the main thread); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_reporting_errors(
    prog: str,
    action: Callable[[], object],
    debug: bool = False,
    resume: str = "re-run the same command to resume",
) -> int:
    """Run ``action`` as a command would: 0 when it returns, the error's ``exit_code`` (2; 3 for an
    :class:`IncompleteError`) with one line on stderr for a :class:`StdaError` (the traceback with ``debug``),
    130 with ``resume`` advice on Ctrl-C, 143 with the same advice on SIGTERM (:func:`sigterm_as_interrupt`).

    An ``OSError`` of the environment (read-only file system, a file where a folder should be, no permission,
    disk full; :data:`ENVIRONMENT_ERRNOS`) that a stage did not turn into a :class:`StdaError` itself is
    reported the same way, naming its path.

    ``stda``, ``train.py`` and the benchmark script all end this way.
    """
    try:
        with sigterm_as_interrupt():
            action()
    except StdaError as err:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        known = environment_error(err)
        if known is None or debug:
            raise
        print(f"{prog}: error: {_one_line(known)}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); {resume}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {resume}", file=sys.stderr)
        return 130
    return 0


def _one_line(err: Exception) -> str:
    """The message of ``err`` on one line (a YAML parser's or a library's message may span several)."""
    return " ".join(str(err).split())
