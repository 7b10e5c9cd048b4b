"""Crash-safe file writing: atomic replace, append-only JSON lines, CSV, and disk-full errors that say what to do.

Every stage writes through these helpers so that an interrupted run never leaves a half-written file that a
later run would take for a finished one.
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

from .errors import StdaError


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get the usual permissions
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        if err.errno == errno.ENOSPC:
            raise _disk_full(path, err) from err
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        drop_torn_tail(path)
        with open(path, "a", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(path, err) from err
        raise


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
    """Read a JSON-lines file; a missing file is empty, and a torn (crash-truncated) last line is skipped.

    Raises
    ------
    StdaError
        When a line other than the last is not valid JSON (the file was edited or corrupted).
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break  # torn final line from an interrupted append
            raise StdaError(
                f"{path}: line {i + 1} is not valid JSON ({err.msg}); fix or delete that line"
            ) from err
    return records
