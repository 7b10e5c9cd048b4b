"""Stage settings as typed dataclasses, loadable from YAML and printable back.

Every stage has one ``@dataclass`` config whose fields carry a comment; :func:`load_config` builds it from a
YAML file plus command-line overrides and rejects unknown keys, :func:`dump_config` writes the resolved
settings beside a stage's output.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import StdaError
from .fileio import write_text

C = TypeVar("C")


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Build a ``cls`` config from an optional YAML file, then ``overrides`` (None values are ignored).

    Raises
    ------
    StdaError
        When the file is missing or not a mapping, or has keys ``cls`` does not know (they are listed).
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise StdaError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise StdaError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise StdaError(f"config file {path} must hold a mapping of setting: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f" in {path}" if path is not None else ""
        raise StdaError(f"unknown setting(s) {unknown}{where}; valid settings: {sorted(known)}")
    return cls(**_coerce(cls, values))


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Turn YAML lists into tuples where the dataclass field is a tuple (so configs stay hashable)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in values.items():
        origin = typing.get_origin(hints.get(k))
        out[k] = tuple(v) if origin is tuple and isinstance(v, list) else v
    return out


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


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved settings of ``cfg`` as YAML (atomically), so a run can be reproduced."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
