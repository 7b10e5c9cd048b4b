"""Small shared helpers: seeding, stable hashes, progress bars and logging setup."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from stda_hf.core.errors import StdaError

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (when imported) PyTorch on every device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds legacy global-state users (torch samplers, old code)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but seeding must not need it
        return
    torch.manual_seed(seed)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hex digest of ``obj`` that is the same on every machine and Python run.

    ``obj`` must be JSON-serialisable; dict keys are sorted, so key order does not matter.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (flat memory for large files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PROGRESS_SWITCHES = ("STDA_NO_PROGRESS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
"""Environment variables that turn progress bars off when set to 1/true/yes (ours, tqdm's, the Hub's)."""


def progress_disabled() -> bool:
    """True when any of :data:`PROGRESS_SWITCHES` is set to a true value."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in PROGRESS_SWITCHES
    )


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar with ETA on stderr, silent when ``STDA_NO_PROGRESS``, ``TQDM_DISABLE`` or
    ``HF_HUB_DISABLE_PROGRESS_BARS`` is set (CI logs, tests).

    ``disable=True`` silences one bar whatever the environment; ``disable=None`` or no ``disable`` lets the
    environment decide.
    """
    if not kwargs.get("disable"):
        kwargs["disable"] = progress_disabled()
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("smoothing", 0.1)
    return tqdm(iterable, **kwargs)


def setup_logging(verbose: bool = False) -> None:
    """Configure the ``stda_hf`` loggers for command-line use (INFO, or DEBUG with ``verbose``)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


SEED_LIMIT = 2**32
"""Seeds are in ``[0, 2**32)``: what NumPy's and PyTorch's generators all accept."""


def check_seed(flag: str, seed: int) -> None:
    """Refuse a seed outside ``[0, 2**32)`` before it reaches a random generator (a negative one crashes NumPy).

    Raises
    ------
    StdaError
        Naming the flag and the value.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise StdaError(f"{flag} {seed!r} must be a whole number from 0 to {SEED_LIMIT - 1} (2**32 - 1)")


def first_few(items: list[str], n: int = 5) -> str:
    """The first ``n`` of ``items`` for an error message, with how many more there are."""
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
