"""The pipeline stages a benchmark runs per fold: teacher, style transfer, pseudo-labels, dataset; then explanations.

Each stage resumes on its own; this is the one module of the benchmark that calls other stages in-process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import StdaError
from .config import DEFAULT_EXPLAIN, EXPLAIN_DIR, BenchmarkConfig, RunKey, fold_dir, needs_synthetic
from .data import check_fold_synthetic, write_fold_view
from .runs import run_command, train_argv
from .table import RunTable

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Fold preparation


def prepare_fold(cfg: BenchmarkConfig, folds, fold: int, sources: dict[str, Path]) -> Path:
    """Build one fold's dataset and return its folder (``stda package`` layout); records ``fold.json``.

    Real view -> (teacher trained on the view's real train images -> synthetic images from its train images
    -> pseudo-labels) -> packaged dataset with validation and test real only.
    """
    from ..fileio import write_json
    from ..package import PackageConfig, package

    d = fold_dir(cfg, fold)
    view = write_fold_view(d / "real", folds, fold, sources)
    info: dict[str, Any] = {"fold": fold, "counts": folds.summary(fold)}
    synthetic = None
    if needs_synthetic(cfg):
        package(view, d / "hub-real", cfg=PackageConfig(name=f"benchmark/{cfg.name}-fold{fold}-real"))
        teacher = train_teacher(cfg, d / "teacher", d / "hub-real")
        synthetic = d / "synthetic"
        info["synthetic"] = make_synthetic(cfg, view, synthetic, teacher)
    package(view, d / "hub", synthetic=synthetic, cfg=PackageConfig(name=f"benchmark/{cfg.name}-fold{fold}"))
    write_json(d / "fold.json", info)
    return d / "hub"


def make_synthetic(cfg: BenchmarkConfig, view: Path, out: Path, teacher: Path) -> dict[str, Any]:
    """Style transfer from the fold's train images, the leakage check, and pseudo-labels; returns counts."""
    from ..generate import GenerateConfig, generate
    from ..label import LabelConfig, label_synthetic

    generate(view, out, GenerateConfig(**cfg.generate))
    images = check_fold_synthetic(view, out)
    summary = label_synthetic(out, LabelConfig(**{**cfg.label, "teacher": str(teacher), "real": str(view)}))
    return {
        "images": images,
        "kept": summary.kept,
        "malignant": summary.labels.get("malignant", 0),
        "teacher": summary.teacher,
    }


def train_teacher(cfg: BenchmarkConfig, run_dir: Path, dataset: Path) -> Path:
    """Train (or reuse) the fold's teacher on real images only, seeded with ``fold_seed``; return its run folder.

    Raises
    ------
    StdaError
        When the training command fails (the message carries the end of its log).
    """
    from ..models.vgg import MODEL_DIR

    if (run_dir / MODEL_DIR / "config.json").is_file():
        return run_dir
    settings = {
        **cfg.train,
        **cfg.teacher,
        "synthetic": "none",
        "seed": cfg.fold_seed,  # fixed with the folds: adding or reordering seeds never changes a teacher
        "dataset": str(dataset),
    }
    argv = train_argv(cfg, settings, run_dir, "resume")
    ok, error, _ = run_command(argv, run_dir.with_suffix(".log"), None, cfg.run_timeout, cfg.cpu_threads)
    if not ok:
        raise StdaError(f"teacher training in {run_dir} failed: {error}")
    return run_dir


def prepare_folds(cfg: BenchmarkConfig, folds, sources: dict[str, Path], wanted: list[int]) -> dict[int, Any]:
    """``{fold: dataset folder}`` for each wanted fold, or the error that stopped its preparation."""
    out: dict[int, Any] = {}
    for fold in wanted:
        logger.info("preparing fold %d of %d", fold + 1, cfg.folds)
        try:
            out[fold] = prepare_fold(cfg, folds, fold, sources)
        except Exception as err:  # one broken fold is recorded against its runs; the others go on
            logger.warning(
                "fold %d could not be prepared: %s", fold, err, exc_info=logger.isEnabledFor(logging.DEBUG)
            )
            out[fold] = f"fold {fold} preparation failed: {type(err).__name__}: {err}"
    return out


# ----------------------------------------------------------------------------------------------------------------
# Explaining finished runs


def explain_run(cfg: BenchmarkConfig, key: RunKey, run_dir: Path) -> dict[str, float | None]:
    """Explain one finished run on its fold's images (``stda explain``); return its ``relevance_*`` numbers.

    Every arm of a fold is explained on the same images (the fold view's ``explain.split``, first ``limit``),
    so the numbers and heatmap grids compare arms directly. Resumes like ``stda explain`` does.
    """
    from ..explain import ExplainConfig, run_explain

    view = fold_dir(cfg, key.fold) / "real"
    settings = ExplainConfig(**{**DEFAULT_EXPLAIN, **cfg.explain})
    summary = run_explain(run_dir, run_dir / EXPLAIN_DIR, settings, images=view, overwrite=True)
    return {k: v for k, v in summary.numbers.items() if k.startswith("relevance_")}


def explain_runs(cfg: BenchmarkConfig, table: RunTable) -> None:
    """Add explanation numbers to every finished run (a failure is noted in the row, the run stays done)."""
    from ..utils import progress

    if not cfg.explain:
        return
    done = [k for k in sorted(table.rows) if table.rows[k]["status"] == "done"]
    for key in progress(done, desc="explain runs", unit="run"):
        row = dict(table.rows[key])
        try:
            row.update(explain_run(cfg, key, cfg.work_dir / str(row["run_dir"])), error="")
        except Exception as err:  # explanations are extra: a failure is recorded, the run's metrics stand
            logger.warning("explaining %s failed: %s", key.name, err)
            row["error"] = f"explain: {type(err).__name__}: {err}"
        table.record(key, **row)
