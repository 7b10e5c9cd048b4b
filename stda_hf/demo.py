"""``stda demo``: the whole flow on phantoms, offline, small enough for two CPU cores.

Each step calls the same stage function the matching ``stda`` command calls, with small settings, and writes
into one folder per stage under ``out`` (``real/``, ...), so a user can open every intermediate result.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .phantoms import PhantomConfig, make_phantoms
from .real import inspect_folder
from .split import SplitConfig, make_splits

logger = logging.getLogger(__name__)


def run_demo(out: str | Path, n: int = 400, size: int = 64, seed: int = 0) -> Path:
    """Run phantoms -> split -> inspect (and the later stages as they land) into ``out``; return ``out``."""
    out = Path(out)
    real = out / "real"
    _step("phantoms", f"{n} phantom lesions at {size}px -> {real}")
    make_phantoms(real, PhantomConfig(n=n, size=size, seed=seed), overwrite=True)
    _step("split", "grouped by lesion, patient and near-duplicates, stratified by class")
    make_splits(real, SplitConfig(seed=seed))
    _step("inspect", str(real))
    print(inspect_folder(real).format())
    return out


def _step(name: str, what: str) -> None:
    print(f"\n== {name}: {what}", flush=True)
