"""Crash-safe file writing and careful reading: atomic replace, append-only JSON lines, CSV, output folders.

Every stage writes through these helpers so that an interrupted run never leaves a half-written file that a
later run would take for a finished one, and reads text through them so that a file in another encoding is one
clear error. An output folder is made with :func:`make_dir`, kept apart from the inputs with
:func:`check_separate`, and held by one run at a time with :func:`exclusive`; a path that cannot be written
(read-only, a file where a folder should be, disk full) is a :class:`~stda_hf.core.errors.StdaError` naming it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from stda_hf.core.errors import StdaError, environment_error
from stda_hf.core.statefile import read_records, read_text

__all__ = [
    "append_jsonl", "append_text", "atomic_write", "check_separate", "check_writable", "csv_text", "drop_torn_tail",
    "exclusive", "make_dir", "open_csv", "read_jsonl", "read_text", "write_bytes", "write_csv", "write_json",
    "write_text",
]  # fmt: skip

try:
    import fcntl
except (
    ImportError
):  # pragma: no cover - Windows: no advisory locks; one run per folder is then up to the user
    fcntl = None  # type: ignore[assignment]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _disk_full(path: Path, err: OSError) -> StdaError:
    return StdaError(
        f"no space left on device while writing {path} ({err.strerror}); free some space and re-run the "
        "same command: finished work is kept and only the rest is redone"
    )


def _write_error(path: Path, err: OSError) -> BaseException:
    """The error to raise for ``err`` while writing ``path``: a :class:`StdaError` when it is the environment's."""
    if err.errno == errno.ENOSPC:
        return _disk_full(path, err)
    return environment_error(err, path) or err


def make_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) if needed and return it.

    Raises
    ------
    StdaError
        When ``path`` or one of its parents is a file, or the file system refuses (read-only, no permission);
        the message names the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StdaError(f"{path} is a file, not a folder; choose another output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StdaError(f"a part of {path} is a file, not a folder; choose another output folder") from None
    except OSError as err:
        raise _write_error(path, err) from err
    return path


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse, before any work, a folder the run could not write its results into (read-only, no permission).

    Raises
    ------
    StdaError
        Naming the folder and why.
    """
    folder = Path(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".stda-write-test.", dir=folder)
    except OSError as err:
        raise _write_error(folder, err) from err
    os.close(fd)
    _remove_quietly(tmp)


def check_separate(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an output folder equal to, inside, or holding one of the ``inputs`` (``{description: path}``).

    Writing into an input would mix new files into it (synthetic images in the real folder); an output that
    holds an input (``--out .``) scatters results around it. Paths are compared after resolving links.

    Raises
    ------
    StdaError
        Naming both paths.
    """
    out_abs = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if out_abs == source or source in out_abs.parents:
            raise StdaError(
                f"the output folder {out} is (inside) the {what} {path}; choose a separate folder"
            )
        if out_abs in source.parents:
            raise StdaError(f"the output folder {out} holds the {what} {path}; choose a separate folder")


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, lock_name: str, busy: str) -> Iterator[Path]:
    """Hold an advisory lock on ``folder/lock_name`` for the block: one run at a time writes a folder.

    The folder is created (:func:`make_dir`). The lock is released when the block ends or the process dies
    (the kernel drops it), so a killed run never blocks the next one. The lock file is removed when the block
    ends, and so is the folder when this call created it and it is still empty (a refused run leaves nothing);
    a run that took the lock checks that the file it locked is still the one at ``lock_name``, so removing it
    never lets two runs in.

    Parameters
    ----------
    folder : path-like
        The output folder.
    lock_name : str
        The lock file's name, e.g. ``.fetch.lock``.
    busy : str
        The error message when another process holds the lock (say which command and what to do).

    Raises
    ------
    StdaError
        ``busy`` when the folder is taken; or the folder cannot be made or written.
    """
    created = not os.path.lexists(folder)
    folder = make_dir(folder)
    lock = folder / lock_name
    try:
        with _locked(lock, busy):
            yield folder
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: the block made nothing


@contextlib.contextmanager
def _locked(lock: Path, busy: str) -> Iterator[None]:
    """Lock the file ``lock`` (made if needed) for the block, then remove it; ``busy`` when another holds it."""
    for _ in range(100):
        try:
            fh = open(
                lock, "a"
            )  # held open for the whole block; "a" never truncates a file another run holds
        except OSError as err:
            raise _write_error(lock, err) from err
        if fcntl is None:  # pragma: no cover - Windows
            break
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StdaError(busy) from None
        if _same_file(fh, lock):
            break
        fh.close()  # the holder removed the file between our open and lock: lock the new one
    else:  # pragma: no cover - 100 runs finishing in a row between two system calls
        raise StdaError(busy)
    with fh:
        try:
            yield
        finally:
            _remove_quietly(lock)  # while still holding it: a later run makes a fresh file


def _same_file(fh: IO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path`` and move it over ``path`` only when the block succeeds.

    The data is flushed and fsync'ed before the rename, so after a crash ``path`` is either the old file or
    the complete new one, never a prefix.

    Parameters
    ----------
    path : path-like
        Destination file. Its folder is created when missing.
    mode : {"w", "wb"}
        Text or binary.
    encoding : str, optional
        Text encoding (ignored for binary mode).
    """
    path = Path(path)
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get the usual permissions
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        raise _write_error(path, err) from err
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def open_csv(path: str | os.PathLike) -> Iterator[csv.DictReader]:
    """A ``csv.DictReader`` over a UTF-8 CSV file, streamed; a byte-order mark before the header is dropped.

    Raises
    ------
    StdaError
        When the file is not UTF-8 text, or not CSV (a NUL byte, an unterminated field), naming it.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        try:
            yield csv.DictReader(fh)
        except UnicodeDecodeError as err:
            raise StdaError(
                f"{path} is not UTF-8 text ({err.reason}: byte 0x{err.object[err.start : err.start + 1].hex()}); "
                "save it as UTF-8"
            ) from err
        except csv.Error as err:
            raise StdaError(f"{path} is not a readable CSV file ({err}); fix or re-create it") from err


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def csv_text(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None, header: bool = True
) -> str:
    """``rows`` as CSV text with a header line: the one CSV dialect of the project (``\\n`` line ends).

    ``columns`` fixes the columns and their order (keys outside them are left out, missing ones are empty);
    by default every key of every row, in order of first appearance. ``header=False`` leaves out the header line
    (rows appended to an existing file).
    """
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(c for r in rows for c in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """Write ``rows`` to ``path`` atomically as CSV (see :func:`csv_text`)."""
    write_text(path, csv_text(rows, columns))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON atomically (byte-identical for equal objects)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (whole lines, ending in a newline) to ``path`` durably: flushed and fsync'ed.

    A crash-torn last line left by an earlier run is cut first (:func:`drop_torn_tail`), so the new lines
    never glue onto half a line. Running out of disk space is a :class:`StdaError` that says what to do.
    """
    path = Path(path)
    make_dir(path.parent)
    try:
        drop_torn_tail(path)
        with open(path, "a", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise _write_error(path, err) from err


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line and fsync it.

    A reader (:func:`read_jsonl`) ignores a torn last line, so a crash mid-append loses at most that record.
    """
    append_text(path, json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")


def drop_torn_tail(path: str | os.PathLike) -> None:
    """Cut a crash-torn last line (no trailing newline) so the next append starts on a fresh line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        data = fh.seek(0) or fh.read()
        fh.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file of records; a missing file is empty, and a torn (crash-truncated) last line is skipped.

    The schema-free form of :func:`stda_hf.core.statefile.read_records` (which also checks fields and unique ids).

    Raises
    ------
    StdaError
        When a line other than a torn last one is not a JSON object, or the path is not a regular file (a FIFO).
    """
    return read_records(path, recover="fix or delete that line")
