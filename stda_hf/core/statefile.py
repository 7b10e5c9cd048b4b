"""Reading the state files the project writes itself (JSON, JSON lines, YAML): one reader, schema-checked.

A state file (``engine.json``, ``source.json``, ``manifest.jsonl``, ``labels.jsonl``, ``generate.yaml``,
``trainer_state.json``, a model's ``config.json`` ...) is read back on every resume. It may have been edited,
truncated, replaced by a FIFO or written by another version; every such case is one
:class:`~stda_hf.core.errors.StdaError` naming the file, the line and what is wrong, and saying how to recover
(the ``recover`` text each caller passes: delete the file, delete a line, re-run a stage).

- :func:`read_json` reads one JSON value, checked against :class:`Fields` when it is a record.
- :func:`read_records` reads JSON lines: every line an object with the required fields, an optional key (``id``)
  unique over the file; a torn last line (a crash mid-append) is skipped.
- :func:`read_yaml` reads a YAML mapping, refusing duplicate keys (YAML itself keeps the last silently).
- :func:`read_text` reads UTF-8 text (a binary or Latin-1 file is one clear error; also in ``fileio``).
- :func:`check_regular` refuses a FIFO, a device or a folder where a state file belongs, before it is opened
  (opening a FIFO blocks until a writer appears: a hang, not an error).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stda_hf.core.errors import StdaError
from stda_hf.core.utils import sha256_file


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark, as spreadsheet programs write it, is dropped).

    Raises
    ------
    StdaError
        When the file is not UTF-8 text (binary, or Latin-1 and the like), naming it and the first bad byte.
    """
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _not_utf8(path: Path, err: UnicodeDecodeError) -> StdaError:
    bad = err.object[err.start : err.start + 1].hex()
    return StdaError(
        f"{path} is not UTF-8 text (byte 0x{bad} at position {err.start}); save it as UTF-8 "
        "(a binary file cannot be used here)"
    )


RERUN = "delete it and re-run the command that wrote it"
"""The default recovery advice: the file is the project's own and can be made again."""

_TYPE_NAMES = {str: "text", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null"}  # fmt: skip


@dataclass(frozen=True)
class Fields:
    """The fields a JSON record must (``required``) or may (``optional``) hold, each with its accepted type(s).

    ``float`` accepts integers too; ``int`` and ``float`` never accept booleans. Fields outside both are allowed
    (files written by a newer version keep working).
    """

    required: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    optional: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)

    def problem(self, record: Any) -> str | None:
        """What is wrong with ``record`` in words, or None when it fits."""
        if not isinstance(record, dict):
            return f"expected a JSON object, found {_describe(record)}"
        for name, kinds in self.required.items():
            if name not in record:
                return f"the field {name!r} is missing"
            if not _fits(record[name], kinds):
                return f"the field {name!r} is {_describe(record[name])}, not {_expected(kinds)}"
        for name, kinds in self.optional.items():
            if name in record and not _fits(record[name], kinds):
                return f"the field {name!r} is {_describe(record[name])}, not {_expected(kinds)}"
        return None


def _fits(value: Any, kinds: type | tuple[type, ...]) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, tuple(k for k in kinds if k is not bool))


def _expected(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if _jsonable(value) else repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{_TYPE_NAMES.get(type(value), type(value).__name__)} {text}"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def check_regular(path: str | os.PathLike, recover: str = RERUN) -> bool:
    """Whether ``path`` exists; refuse it when it is not a regular file (FIFO, socket, device, folder).

    Links are followed (a link to a regular file is fine). Checked before opening: a FIFO would block the
    reader forever.

    Raises
    ------
    StdaError
        Naming the path, what it is instead, and ``recover``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise StdaError(f"{path}: a part of the path is a file, not a folder; {recover}") from None
    if stat.S_ISREG(mode):
        return True
    kind = (
        "a folder" if stat.S_ISDIR(mode) else
        "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
        "a socket" if stat.S_ISSOCK(mode) else
        "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
    )  # fmt: skip
    raise StdaError(f"{path} is {kind}, not a regular file; {recover}")


def _text(path: Path, recover: str) -> str:
    if not check_regular(path, recover):
        raise StdaError(f"{path} not found; {recover}")
    try:
        return read_text(path)
    except StdaError as err:
        raise StdaError(f"{err}; {recover}") from None


_MISSING: Any = object()


def read_json(
    path: str | os.PathLike, fields: Fields | None = None, recover: str = RERUN, default: Any = _MISSING
) -> Any:
    """The JSON value in ``path``, checked against ``fields`` (then it must be an object).

    Parameters
    ----------
    path : path-like
        The state file.
    fields : Fields, optional
        The record's schema; None accepts any JSON value.
    recover : str
        What the user should do when the file is bad (the end of the message).
    default : optional
        Returned when ``path`` does not exist; without it a missing file is an error.

    Raises
    ------
    StdaError
        Missing (without ``default``), not a regular file, not UTF-8, not JSON (with the line), or not the schema.
    """
    path = Path(path)
    if default is not _MISSING and not check_regular(path, recover):
        return default
    text = _text(path, recover)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise StdaError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); {recover}") from None
    problem = fields.problem(value) if fields is not None else None
    if problem:
        raise StdaError(f"{path}: {problem}; {recover}")
    return value


def read_records(
    path: str | os.PathLike, fields: Fields | None = None, key: str | None = None, recover: str = RERUN
) -> list[dict]:
    """The records of the JSON-lines file ``path``; a missing file has none.

    Blank lines are skipped, and so is a torn last line (no newline, not JSON: a crash mid-append); the next
    append cuts it (:func:`~stda_hf.core.fileio.append_text`).

    Parameters
    ----------
    path : path-like
        The JSON-lines file.
    fields : Fields, optional
        Each record's schema (default: any JSON object).
    key : str, optional
        A field whose value must be unique over the file (``id``); a second line with the same value is an error.
    recover : str
        What the user should do (the end of the message), e.g. "delete that line; its image is made again".

    Raises
    ------
    StdaError
        ``path, line N: what is wrong; recover`` for the first bad line.
    """
    path = Path(path)
    if not check_regular(path, recover):
        return []
    fields = fields or Fields()
    lines = _text(path, recover).splitlines()
    records: list[dict] = []
    seen: dict[Any, int] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) and not _ends_with_newline(path):
                break  # torn final line from an interrupted append
            raise StdaError(f"{path}, line {i}: not valid JSON ({err.msg}); {recover}") from None
        problem = fields.problem(record)
        if problem is None and key is not None:
            problem = _duplicate(record, key, seen, i)
        if problem:
            raise StdaError(f"{path}, line {i}: {problem}; {recover}")
        records.append(record)
    return records


def _duplicate(record: dict, key: str, seen: dict[Any, int], line: int) -> str | None:
    value = record.get(key)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return None if key not in record else f"the field {key!r} is {_describe(value)}, not text"
    if value in seen:
        return f"{key} {value!r} appears twice (first on line {seen[value]}), so which one holds is unclear"
    seen[value] = line
    return None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the default constructor reports it
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"the key {key!r} appears twice (first on line {first.start_mark.line + 1}, again on line "
                f"{key_node.start_mark.line + 1}); keep one",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml(text: str) -> Any:
    """``text`` parsed as YAML like ``yaml.safe_load``, but a key given twice in one mapping is an error.

    Raises
    ------
    yaml.YAMLError
        Not YAML, or a duplicate key (the message gives both lines).
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: str | os.PathLike, recover: str = RERUN, what: str = "") -> dict[str, Any]:
    """The YAML mapping in ``path`` (empty file: ``{}``); duplicate keys refused.

    Parameters
    ----------
    path : path-like
        The YAML file.
    recover : str
        What the user should do (the end of the message).
    what : str
        What the file is, put before its path in messages ("config file ").

    Raises
    ------
    StdaError
        Missing, not a regular file (a folder given as ``--config``), not UTF-8, not YAML, a duplicate key, or
        not a mapping; naming the file and the line.
    """
    path = Path(path)
    try:
        found = check_regular(path, recover)
    except StdaError as err:
        raise StdaError(f"{what}{err}") from None
    if not found:
        raise StdaError(f"{what}{path} not found")
    try:
        loaded = parse_yaml(_text(path, recover))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise StdaError(f"{what}{path} is not valid YAML ({where}{problem}); {recover}") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise StdaError(
            f"{what}{path} must hold a mapping of setting: value, not {_describe(loaded)}; {recover}"
        )
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# The synthetic folder's records: generate writes them; label, package and the benchmark read them

MANIFEST_FIELDS = Fields(
    required={"id": str, "file": str, "content_id": str, "style_id": str},
    optional={"seed": int, "quality": (dict, type(None)), "sha256": str, "params_hash": str, "engine": str},
)
"""The schema of a ``manifest.jsonl`` line (fields added later are optional, so old manifests keep working)."""

LABEL_FIELDS = Fields(
    required={"id": str, "label": str, "confidence": float, "teacher": str},
    optional={"probs": list, "entropy": float},
)
"""The schema of a ``labels.jsonl`` line."""

MANIFEST_RECOVER = (
    "delete that line (and its image) and re-run `stda generate`, which makes it again, or delete the whole "
    "synthetic folder"
)
LABELS_RECOVER = "delete that line (or the file) and re-run `stda label`, which labels those images again"


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """The records of a synthetic folder's ``manifest.jsonl`` (or a rank shard): schema-checked, ids unique.

    Each record's ``file`` must be ``images/<id>.<ext>`` in the folder (generate never writes another name, and
    a record edited to point at another image would ship its pixels twice).

    Raises
    ------
    StdaError
        ``path, line N: what is wrong; how to recover``.
    """
    path = Path(path)
    records = read_records(path, MANIFEST_FIELDS, key="id", recover=MANIFEST_RECOVER)
    for i, record in enumerate(records):
        file = Path(record["file"])
        if file.parent != Path("images") or file.stem != record["id"]:
            line = _line_of(path, record["id"], i)
            raise StdaError(
                f"{path}, line {line}: the file of {record['id']} is {record['file']!r}, not images/"
                f"{record['id']}.<ext> as generate writes it (edited?); {MANIFEST_RECOVER}"
            )
    return records


def _line_of(path: Path, record_id: str, index: int) -> int:
    """The line number of the record ``record_id`` (``index``-th record) in ``path``, for messages."""
    needle = json.dumps(record_id, ensure_ascii=False)
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if f'"id": {needle}' in line:
            return n
    return index + 1


def read_labels(path: str | os.PathLike) -> list[dict]:
    """The records of a synthetic folder's ``labels.jsonl``: schema-checked, one label per id.

    Raises
    ------
    StdaError
        ``path, line N: what is wrong; how to recover`` (a second label for an id included).
    """
    return read_records(path, LABEL_FIELDS, key="id", recover=LABELS_RECOVER)


def image_digest_problem(folder: str | os.PathLike, record: dict) -> str | None:
    """Why the image of manifest ``record`` in ``folder`` is not the one generate wrote; None when it is.

    A record written before digests were recorded (no ``sha256``) is taken as it is: such manifests keep
    working, unchecked (a folder made again by this version records them).
    """
    expected = record.get("sha256")
    path = Path(folder) / record["file"]
    if expected is None or not path.is_file():
        return None
    if sha256_file(path) != expected:
        return (
            f"{path} is not the image its manifest record ({record['id']}) was written for: its SHA-256 differs "
            "from the one recorded (replaced or edited since)"
        )
    return None
