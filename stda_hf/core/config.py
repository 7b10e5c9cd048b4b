"""Stage settings as typed dataclasses, loadable from YAML and printable back.

Every stage has one ``@dataclass`` config whose fields carry a comment; :func:`load_config` builds it from a
YAML file plus command-line overrides and rejects unknown keys, :func:`dump_config` writes the resolved
settings beside a stage's output, and :func:`read_settings` with :func:`changed_settings` is the one
"saved settings vs now" guard of every resumable stage. :func:`add_config_flags` and :func:`config_from_args` turn the same
dataclass into command-line flags (``stda``, ``train.py`` and the benchmark script share them).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import io
import math
import os
import tokenize
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import write_text
from stda_hf.core.statefile import read_yaml

C = TypeVar("C")


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Build a ``cls`` config from an optional YAML file, then ``overrides`` (None values are ignored).

    Every value is checked against its field's type first (:func:`check_types`), so a wrong type is refused
    naming the setting and the value instead of failing somewhere inside the stage.

    Raises
    ------
    StdaError
        When the file is missing, a folder, not UTF-8 text, not YAML (a key given twice included) or not a mapping;
        has keys ``cls`` does not know (they
        are listed); or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        recover = "give a YAML file of setting: value (a stage's saved settings file is one)"
        loaded = read_yaml(path, recover=recover, what="config file ")
        keys = [k for k in loaded if not isinstance(k, str)]
        if keys:
            raise StdaError(f"config file {path}: setting names must be text, got {keys[0]!r}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    from_file = set(values)
    flags = {k: v for k, v in overrides.items() if v is not None}
    values.update(flags)
    known = {f.name for f in dataclasses.fields(cls)}
    removed = getattr(cls, "REMOVED", {})  # {old setting: what replaces it}
    for name in sorted(set(values) & set(removed)):
        where = f" (in {path})" if name in from_file and name not in flags else ""
        raise StdaError(f"--{name.replace('_', '-')}{where} was removed: {removed[name]}")
    unknown = sorted(set(values) - known)
    if unknown:
        where = f" in {path}" if path is not None else ""
        raise StdaError(f"unknown setting(s) {unknown}{where}; valid settings: {sorted(known)}")
    origin = {k: (f"in {path}" if k in from_file and k not in flags else "") for k in values}
    return cls(**check_types(cls, values, origin))


def check_types(
    cls: type, values: Mapping[str, Any], where: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``values`` checked against the field types of dataclass ``cls``, with the safe conversions applied.

    ``int`` takes integers (not booleans); ``float`` takes finite numbers; ``str`` takes text (a whole number
    becomes its digits); ``bool`` takes true/false; ``X | None`` also takes null; ``tuple[X, ...]`` takes a list
    (or one value) of X; ``dict`` a mapping; ``Literal[...]`` one of its values. Other types are not checked.

    Parameters
    ----------
    cls : type
        A dataclass.
    values : mapping
        Setting name -> value (names must be fields of ``cls``).
    where : mapping, optional
        Setting name -> where its value came from (``"in cfg.yaml"``), for the message.

    Raises
    ------
    StdaError
        Naming the first setting whose value has the wrong type, the value and what it should be.
    """
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        try:
            out[name] = _check_value(hints.get(name, Any), value)
        except _WrongType as err:
            flag = "--" + name.replace("_", "-")
            place = (where or {}).get(name) or f"({flag})"
            raise StdaError(f"setting {name} {place}: {value!r} is not {err}") from None
    return out


class _WrongType(Exception):
    """What a value should have been (a phrase: "an integer")."""


_NONE = type(None)


def _check_value(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        if value is None and _NONE in args:
            return None
        rest = [a for a in args if a is not _NONE]
        if len(rest) == 1:
            return _check_value(rest[0], value)
        return value  # a union of several types: left to the config's own checks
    if origin is typing.Literal:
        if value not in args:
            raise _WrongType(f"one of {list(args)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _WrongType("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _WrongType("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _WrongType("a number")
        if not math.isfinite(value):
            raise _WrongType("a finite number")
        return float(value)
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise _WrongType("text (quote it in YAML)")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise _WrongType("a path")
        return Path(value)
    if origin is tuple:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        item = args[0] if args else Any
        try:
            return tuple(_check_value(item, v) for v in items)
        except _WrongType as err:
            raise _WrongType(f"a list of values that are each {err}") from None
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise _WrongType("a mapping of key: value")
        return dict(value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (paths as strings, tuples as lists), ready for YAML or JSON."""
    return {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def read_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings a stage saved as YAML in ``path`` (see :func:`dump_config`); None when there is no such file.

    Raises
    ------
    StdaError
        When the file is not a regular file (a FIFO), not valid YAML, has a key twice or is not a mapping (naming
        it, the line and what to do).
    """
    path = Path(path)
    if not os.path.lexists(path):
        return None
    return read_yaml(path, recover="delete it to start the folder afresh")


def changed_settings(
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    ignore: Collection[str] = (),
    keys: Iterable[str] | None = None,
    missing_is_change: bool = True,
) -> list[str]:
    """The settings whose saved value differs from ``now``: the guard every resumable stage runs first.

    Parameters
    ----------
    saved, now : mapping
        The settings an output folder was made with, and the settings of this run.
    ignore : collection of str
        Settings that may change between runs (resume controls, output locations).
    keys : iterable of str, optional
        Compare only these settings (default: every setting of ``now``).
    missing_is_change : bool
        Whether a setting absent from ``saved`` counts as changed (False for files written before it existed).

    Returns
    -------
    list of str
        The changed settings, in the order of ``keys`` (or ``now``).
    """
    names = [k for k in (now if keys is None else keys) if k not in ignore and k in now]
    if not missing_is_change:
        names = [k for k in names if k in saved]
    return [k for k in names if saved.get(k) != now[k]]


def describe_changes(saved: Mapping[str, Any], now: Mapping[str, Any], names: Iterable[str]) -> str:
    """``name: saved -> now, ...``: the changed settings as an error message names them."""
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in names)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved settings of ``cfg`` as YAML (atomically), so a run can be reproduced."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# Dataclass configs as flags


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a dataclass's source: the help text of its flag."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, last_name = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and last_name is None:
            last_name = tok.string
        elif tok.type == tokenize.COMMENT and last_name and tok.start[1] > 4:
            comments.setdefault(last_name, tok.string.lstrip("# ").strip())
        elif tok.type == tokenize.NEWLINE:
            last_name = None
    for base in cls.__mro__[1:]:  # inherited fields keep their base dataclass's comment
        if dataclasses.is_dataclass(base):
            for name, text in field_comments(base).items():
                comments.setdefault(name, text)
    return comments


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming ``--help`` (exit status 2), not the whole usage;
    a flag in another spelling (``--output_dir``, as ``transformers`` writes it) gets the right one suggested."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)}; see `{self.prog} --help`\n")

    def _suggestion(self, message: str) -> str:
        if "unrecognized arguments:" not in message:
            return ""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        hints = []
        for word in message.split("unrecognized arguments:", 1)[1].split():
            flag = word.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            dashed = flag.replace("_", "-")
            match = (
                dashed if dashed in known else next(iter(difflib.get_close_matches(dashed, known, 1)), None)
            )
            if match and match != flag:
                hints.append(f"{flag} -> {match}")
        return f" (did you mean {', '.join(hints)}?)" if hints else ""


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Add ``--field-name`` for each scalar, bool or tuple field of dataclass ``cls``.

    Flags default to ``None`` so a value from ``--config`` is only overridden when the flag is given; the help
    shows the dataclass default.
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        comment = comments.get(f.name, "")
        help_ = (
            comment if "default" in comment or default == "" else f"{comment} (default: {default})".strip()
        )
        origin = typing.get_origin(hint)
        if hint is bool or _optional_scalar(hint, (bool,)):  # bool | None: unset means "the preset decides"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif origin is tuple:
            item = typing.get_args(hint)[0]
            parser.add_argument(flag, nargs="+", type=item, default=None, metavar=f.name.upper(), help=help_)
        elif hint in (int, float, str):
            parser.add_argument(flag, type=hint, default=None, metavar=f.name.upper(), help=help_)
        elif _optional_scalar(hint):
            parser.add_argument(
                flag, type=_optional_scalar(hint), default=None, metavar=f.name.upper(), help=help_
            )
        # dicts and other structured settings are set through --config
    for name in getattr(cls, "REMOVED", {}):  # accepted only to be refused with what replaces it
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=argparse.SUPPRESS)


def _optional_scalar(hint: object, kinds: tuple[type, ...] = (int, float, str)) -> type | None:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in kinds else None


def config_from_args(cls: type, args: argparse.Namespace, **extra: object):
    """Build ``cls`` from ``--config`` (if given), then the flags that were set, then ``extra``."""
    names = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "REMOVED", {}))
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update({k: v for k, v in extra.items() if v is not None})
    return load_config(cls, getattr(args, "config", None), **values)
