"""The run table ``runs.csv``: one row per run (arm, fold, seed, status, metrics, error), rewritten atomically."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stda_hf.benchmark.config import AREA_METRICS, EXPLANATION_METRICS, METRICS, RUN_COLUMNS, STATUSES, RunKey
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import csv_text, write_text

logger = logging.getLogger(__name__)


@dataclass
class RunTable:
    """``runs.csv``: one row per attempted run (arm, repeat, fold, seed, status, seconds, run_dir, metrics..., error)."""

    path: Path
    rows: dict[RunKey, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> RunTable:
        """Read a table; a missing file is an empty table.

        Raises
        ------
        StdaError
            When a row lacks the key columns or has an unknown status.
        """
        table = cls(Path(path))
        if not table.path.is_file():
            return table
        with open(table.path, newline="", encoding="utf-8") as fh:
            for line_no, row in enumerate(csv.DictReader(fh), start=2):
                key, parsed = _parse_row(row, f"{table.path} line {line_no}")
                table.rows[key] = parsed
        return table

    def save(self) -> None:
        """Rewrite the table atomically (an interrupted save leaves the previous table)."""
        write_text(self.path, self.to_csv())

    def to_csv(self) -> str:
        """The table as CSV text, rows in plan order, metric columns after the key columns."""
        extra = sorted({k for r in self.rows.values() for k in r} - set(RUN_COLUMNS) - {"error"})
        metrics = [
            m for m in (*METRICS, *EXPLANATION_METRICS, *AREA_METRICS) if m in extra
        ]  # the rest: alphabetical
        columns = [*RUN_COLUMNS, *metrics, *(c for c in extra if c not in metrics), "error"]
        return csv_text(
            ({c: _cell(self.rows[key].get(c)) for c in columns} for key in sorted(self.rows)), columns
        )

    def status(self, key: RunKey) -> str | None:
        """``done``, ``failed``, ``running`` (interrupted), or None when never started."""
        row = self.rows.get(key)
        return row["status"] if row else None

    def todo(self, keys: list[RunKey], retry_failed: bool = False) -> list[RunKey]:
        """The runs of ``keys`` still to do: never started, interrupted, and failed ones if ``retry_failed``."""
        redo = {None, "running"} | ({"failed"} if retry_failed else set())
        return [k for k in keys if self.status(k) in redo]

    def record(self, key: RunKey, status: str, **values: Any) -> None:
        """Set a run's row (replacing an earlier attempt) and save the table."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}; valid: {STATUSES}")
        keys = {"arm": key.arm, "repeat": key.repeat, "fold": key.fold, "seed": key.seed}
        self.rows[key] = {**keys, "status": status, **values}
        self.save()

    def done(self) -> list[dict[str, Any]]:
        """Rows of finished runs, in plan order."""
        return [self.rows[k] for k in sorted(self.rows) if self.rows[k]["status"] == "done"]


def _parse_row(row: dict[str, str], where: str) -> tuple[RunKey, dict[str, Any]]:
    try:
        key = RunKey(int(row["fold"]), int(row["seed"]), row["arm"], int(row.get("repeat") or 0))
    except (KeyError, TypeError, ValueError):
        raise StdaError(
            f"{where}: needs integer fold and seed and an arm; delete the row to redo it"
        ) from None
    if row.get("status") not in STATUSES:
        raise StdaError(f"{where}: unknown status {row.get('status')!r}; valid: {list(STATUSES)}")
    parsed: dict[str, Any] = {"arm": key.arm, "repeat": key.repeat, "fold": key.fold, "seed": key.seed}
    for col, text in row.items():
        if col in parsed or col is None:
            continue
        parsed[col] = text if col in ("status", "run_dir", "error") else _number(text)
    return key, parsed


def _number(text: str | None) -> float | str | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return " ".join(str(value).split())  # one line per row, whatever the error said
