"""The project's own ``evaluate`` modules, shipped with the package and loaded by path (no Hub download).

Each module lives in ``stda_hf/metrics/<name>/<name>.py``, the layout ``evaluate.load(<folder>)`` expects. Plain
measures that are not ``evaluate`` modules sit beside them as modules (:mod:`stda_hf.metrics.artifact_copy`).
"""

from __future__ import annotations

from pathlib import Path

from stda_hf.core.errors import StdaError

METRICS_DIR = Path(__file__).parent


def metric_path(name: str = "binary_classification") -> str:
    """The folder of the project's ``evaluate`` module ``name``, ready for ``evaluate.load``.

    Raises
    ------
    StdaError
        When no such module ships with the package (the valid names are listed).
    """
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise StdaError(f"no evaluate module {name!r} in {METRICS_DIR}; available: {known}")
    return str(folder)


def load_metric(name: str = "binary_classification", **kwargs):
    """``evaluate.load`` of the project's module ``name``, kept in memory (no cache files, no network)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)
