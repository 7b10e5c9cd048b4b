"""The benchmark itself: check the protocol, prepare the folds, run what is missing, write the report."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stda_hf.benchmark.config import (
    AREA_METRICS,
    DEFAULT_EXPLAIN,
    EXPLANATION_METRICS,
    RELIANCE_METRICS,
    BenchmarkConfig,
    RunKey,
    arm_uses_synthetic,
    fold_dir,
    legacy_generate,
    plan_runs,
    train_settings,
)
from stda_hf.benchmark.data import prepare_sources
from stda_hf.benchmark.plots import plot_boxplots, plot_heatmaps, plot_learning_curves
from stda_hf.benchmark.report import render_report
from stda_hf.benchmark.runs import execute_runs, find_heatmap, read_run_log
from stda_hf.benchmark.stages import LABEL_SOURCES, explain_runs, prepare_folds, reliance_runs
from stda_hf.benchmark.stats import BenchmarkStats, compute_stats
from stda_hf.benchmark.table import RunTable
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import write_json, write_text

logger = logging.getLogger(__name__)


def check_stage_settings(cfg: BenchmarkConfig) -> None:
    """Build every stage's config from the benchmark's settings now, so a typo fails before hours of work.

    Raises
    ------
    StdaError
        Naming the section (``generate``, ``arms.mix``, ...) and the stage's own complaint.
    """
    from stda_hf.core.config import load_config
    from stda_hf.explain import ExplainConfig
    from stda_hf.generate import GenerateConfig
    from stda_hf.label import LabelConfig

    teacher = {"teacher": "<each fold's teacher>"}
    checks: list[tuple[str, type, dict[str, Any], Any]] = [
        ("generate", GenerateConfig, cfg.generate, None),
        ("label", LabelConfig, {**cfg.label, **teacher}, None),
    ]
    for arm, settings in cfg.arms.items():
        if settings.get("generate"):
            checks.append(
                (f"arms.{arm}.generate", GenerateConfig, {**cfg.generate, **settings["generate"]}, None)
            )
        if settings.get("label"):
            label = dict(settings["label"])
            if label.pop("source", "teacher") not in LABEL_SOURCES:
                raise StdaError(
                    f"benchmark setting `arms.{arm}.label.source`: {settings['label']['source']!r}; "
                    f"valid: {list(LABEL_SOURCES)}"
                )
            checks.append((f"arms.{arm}.label", LabelConfig, {**cfg.label, **label, **teacher}, None))
    if cfg.explain:
        checks.append(("explain", ExplainConfig, {**DEFAULT_EXPLAIN, **cfg.explain}, None))
    if not cfg.train_command:  # train.py's own settings; another trainer may take others
        from stda_hf.training import TrainConfig, check_config

        checks.append(("teacher", TrainConfig, {**cfg.train, **cfg.teacher}, check_config))
        checks += [
            (f"arms.{a}", TrainConfig, {**cfg.train, **train_settings(s)}, check_config)
            for a, s in cfg.arms.items()
        ]
    for where, cls, values, extra_check in checks:
        try:
            built = load_config(cls, None, **values)
            if extra_check is not None:
                extra_check(built)
        except StdaError as err:
            raise StdaError(f"benchmark setting `{where}`: {err}") from None
    check_thresholds(cfg)


def check_thresholds(cfg: BenchmarkConfig) -> None:
    """Refuse a benchmark whose pseudo-label threshold differs from the training threshold of an arm.

    `stda label`'s ``min_confidence`` is what the labels summary, the card and the report count as kept;
    train.py's ``min_confidence`` is what training actually uses. If they differ, the report describes a
    synthetic set the arm never trained on.

    Raises
    ------
    StdaError
        Naming the arm and both thresholds.
    """
    from stda_hf.label import LabelConfig
    from stda_hf.training import TrainConfig

    label_default = LabelConfig.__dataclass_fields__["min_confidence"].default
    train_default = TrainConfig.__dataclass_fields__["min_confidence"].default
    for arm, settings in cfg.arms.items():
        if not arm_uses_synthetic(settings):
            continue
        label = {**cfg.label, **settings.get("label", {})}.get("min_confidence", label_default)
        train = {**cfg.train, **train_settings(settings)}.get("min_confidence", train_default)
        if float(label) != float(train):
            raise StdaError(
                f"arm {arm!r} trains with min_confidence {train} but its pseudo-labels are thresholded at "
                f"{label} (label.min_confidence); set both to the same value"
            )


def protocol_record(cfg: BenchmarkConfig, partitions: dict[int, Any]) -> dict[str, Any]:
    """What fixes the meaning of every run (data, folds, stage and training settings) and each arm's settings.

    ``partitions`` maps each fold seed to its folds; repetitions may be added later, so they are recorded
    apart from the protocol (``fold_assignments``: one digest per fold seed)."""
    from stda_hf.core.config import config_to_dict
    from stda_hf.core.utils import stable_hash

    plain = config_to_dict(cfg)
    keys = (
        "phantoms",
        "shortcut",
        "folds",
        "val",
        "phash_distance",
        "train",
        "teacher",
        "generate",
        "label",
    )
    protocol = {k: plain[k] for k in keys}
    protocol["generate"] = legacy_generate(protocol["generate"])
    protocol["real"] = str(Path(cfg.real).resolve()) if cfg.real else ""
    assignments = {str(seed): stable_hash(f.assignments) for seed, f in partitions.items()}
    return {
        "protocol": protocol,
        "fold_assignments": assignments,
        "arms": {a: stable_hash(s) for a, s in plain["arms"].items()},
    }


def check_protocol(cfg: BenchmarkConfig, partitions: dict[int, Any]) -> None:
    """Refuse to add runs to a work folder whose earlier runs used another protocol or other arm settings.

    Seeds and new arms may be added at any time; anything that would make old and new runs incomparable is
    refused, naming the settings that changed.

    Raises
    ------
    StdaError
        Naming the changed settings or arms and what to do.
    """
    from stda_hf.core.config import changed_settings
    from stda_hf.core.fileio import write_json
    from stda_hf.core.statefile import Fields, read_json

    path = cfg.work_dir / "protocol.json"
    current = protocol_record(cfg, partitions)
    recover = "delete it only if the runs in that folder may be redone from scratch; else restore it"
    saved = read_json(
        path, Fields(required={"protocol": dict, "arms": dict}), recover=recover, default=current
    )
    saved_folds = saved.get("fold_assignments") or _old_assignments(saved["protocol"])
    changed = sorted(changed_settings(saved["protocol"], current["protocol"], missing_is_change=False))
    changed += [
        f"folds of fold seed {seed}"
        for seed in sorted(set(saved_folds) & set(current["fold_assignments"]))
        if saved_folds[seed] != current["fold_assignments"][seed]
    ]
    if changed:
        raise StdaError(
            f"{cfg.work_dir} holds runs made with other {changed} settings; its runs would not be comparable. "
            "Use another `out` folder (or name), or restore the settings"
        )
    arms = sorted(changed_settings(saved["arms"], current["arms"], missing_is_change=False))
    if arms:
        raise StdaError(
            f"arm(s) {arms} changed settings since their runs in {cfg.work_dir}; give the new settings a new arm "
            f"name, or delete {cfg.work_dir / 'runs'}/<arm> and its rows in runs.csv to redo them"
        )
    write_json(
        path,
        {
            "protocol": current["protocol"],
            "fold_assignments": {**saved_folds, **current["fold_assignments"]},
            "arms": {**saved["arms"], **current["arms"]},
        },
    )


def _old_assignments(protocol: dict[str, Any]) -> dict[str, str]:
    """The fold digest of a ``protocol.json`` written before repeated cross-validation (one fold seed)."""
    if "fold_assignments" in protocol and "fold_seed" in protocol:
        return {str(protocol["fold_seed"]): protocol["fold_assignments"]}
    return {}


def run_benchmark(cfg: BenchmarkConfig, config_path: str = "", report_only: bool = False) -> Path:
    """Run (or resume, or extend) the benchmark and write its report; return the report's path.

    Parameters
    ----------
    cfg : BenchmarkConfig
        The protocol, arms and settings.
    config_path : str
        The YAML file ``cfg`` came from, quoted in the report's reproduce line.
    report_only : bool
        Only re-render the report from the runs already recorded.

    Raises
    ------
    StdaError
        Bad settings, unusable data, or a work folder holding runs of another protocol. A failing run or fold
        is recorded in the table, not raised.
    """
    from stda_hf.core.config import dump_config
    from stda_hf.data.split import make_folds

    if not report_only:
        check_stage_settings(cfg)
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        if cfg.cpu_threads > 0:
            import torch

            torch.set_num_threads(cfg.cpu_threads)
        sources = prepare_sources(cfg)
        partitions = {
            seed: make_folds(sources["test"], cfg.folds, seed, cfg.val, cfg.phash_distance)
            for seed in cfg.cv_seeds
        }
        check_protocol(cfg, partitions)
        dump_config(cfg, cfg.work_dir / "benchmark.yaml")
        table = RunTable.load(cfg.work_dir / "runs.csv")
        record_declaration(cfg, table)
        todo = table.todo(plan_runs(cfg), cfg.retry_failed)
        logger.info("%d of %d runs to do", len(todo), len(plan_runs(cfg)))
        datasets: dict[tuple[int, int], Any] = {}
        for repeat, seed in enumerate(cfg.cv_seeds):
            wanted = sorted({k.fold for k in todo if k.repeat == repeat})
            datasets.update(prepare_folds(cfg, partitions[seed], sources, wanted, repeat))
        execute_runs(cfg, table, todo, datasets)
        explain_runs(cfg, table)
        reliance_runs(cfg, table)
    return write_report(cfg, config_path)


def write_report(cfg: BenchmarkConfig, config_path: str = "") -> Path:
    """Render ``report.md``, ``runs.csv``, ``stats.json`` and the plots into the report folder.

    A hand-written ``reading.md`` in the report folder is kept and quoted under "Reading".

    Raises
    ------
    StdaError
        When the work folder has no run table yet.
    """
    table_path = cfg.work_dir / "runs.csv"
    if not table_path.is_file():
        raise StdaError(f"{table_path} not found: no runs yet; run the benchmark without --report-only first")
    table = RunTable.load(table_path)
    rows = list(table.rows.values())
    stats = report_stats(cfg, rows)
    out = cfg.report_dir
    plots = render_plots(cfg, table, stats, out)
    reading = (out / "reading.md").read_text(encoding="utf-8") if (out / "reading.md").is_file() else ""
    failed = [r for r in rows if r["status"] == "failed"]
    declaration = read_declaration(cfg)
    text = render_report(cfg, stats, read_fold_info(cfg), failed, plots, reading, config_path, declaration)
    write_text(out / "runs.csv", table.to_csv())
    _write_stats_json(out / "stats.json", stats)
    write_text(out / "report.md", text)
    return out / "report.md"


def report_stats(cfg: BenchmarkConfig, rows: list[dict[str, Any]]) -> BenchmarkStats:
    """The report's statistics of the run table's ``rows``: the metrics and explanation numbers tested against
    the baseline, the reference levels (untrained shares, areas) only summarised."""
    arms = list(dict.fromkeys([*cfg.arms, *(r["arm"] for r in rows)]))
    return compute_stats(
        rows,
        arms,
        cfg.baseline,
        report_explanations(cfg),
        primary=cfg.primary_endpoint,
        folds=cfg.folds,
        area_metrics=report_references(cfg),
        alpha=cfg.alpha,
    )


DECLARATION_FILE = "declaration.json"
"""The primary endpoint and the power prior as first declared, with how many runs had finished by then."""


def record_declaration(cfg: BenchmarkConfig, table: RunTable) -> dict[str, Any]:
    """Write the primary endpoint's declaration once, before runs start; later runs keep the first one.

    The report calls the primary endpoint "declared before the runs" only when this record names the same endpoint
    and was written when no run had finished.
    """
    path = cfg.work_dir / DECLARATION_FILE
    current = declaration_of(cfg)
    if path.is_file():
        first = read_declaration(cfg)
        if {k: first.get(k) for k in current} != current:
            logger.warning(
                "the primary endpoint or its prior changed since %s declared %s; the report will say so",
                path,
                {k: first.get(k) for k in current},
            )
        return first
    done = sum(1 for r in table.rows.values() if r["status"] == "done")
    record = {
        **current,
        "declared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs_done": done,
    }
    write_json(path, record)
    return record


def declaration_of(cfg: BenchmarkConfig) -> dict[str, Any]:
    """The parts of a configuration that must be fixed before the runs: the primary endpoint and the power prior."""
    arm, metric = cfg.primary_endpoint
    return {"arm": arm, "metric": metric, "alpha": cfg.alpha, "prior_fold_sd": cfg.prior_fold_sd}


def read_declaration(cfg: BenchmarkConfig) -> dict[str, Any]:
    """The recorded declaration, or {} when the benchmark predates the record (or has not run yet)."""
    path = cfg.work_dir / DECLARATION_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StdaError(
            f"{path}: unreadable ({err}); delete it only if you accept an undeclared primary endpoint"
        ) from err
    if not isinstance(record, dict):
        raise StdaError(
            f"{path}: not a JSON object; delete it only if you accept an undeclared primary endpoint"
        )
    return record


def report_explanations(cfg: BenchmarkConfig) -> tuple[str, ...]:
    """Explanation numbers the report shows and tests: lesion and artifacts, the planted shortcut's own share,
    and the reliance measures of a shortcut benchmark."""
    return (*_shares(cfg), *(RELIANCE_METRICS if cfg.shortcut else ()))


def report_references(cfg: BenchmarkConfig) -> tuple[str, ...]:
    """The untrained model's share of each region, then the regions' areas: the reference levels every share is
    read against. Summarised beside the shares, never tested: the untrained model of a fold is the same for
    every arm, so its difference is zero by construction and would only pad the Holm family."""
    return (*(f"untrained_{share}" for share in _shares(cfg)), *AREA_METRICS)


def _shares(cfg: BenchmarkConfig) -> tuple[str, ...]:
    if cfg.shortcut:
        return (*EXPLANATION_METRICS, f"relevance_on_{cfg.shortcut['artifact']}")
    return EXPLANATION_METRICS


def read_fold_info(cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """The ``fold.json`` of each prepared fold (counts, synthetic images), in fold order."""
    from stda_hf.core.statefile import Fields, read_json

    paths = [fold_dir(cfg, f, r) / "fold.json" for r in range(len(cfg.cv_seeds)) for f in range(cfg.folds)]
    recover = "delete the fold's folder: the next run prepares it again"
    return [read_json(p, Fields(), recover=recover) for p in paths if p.is_file()]


def render_plots(cfg: BenchmarkConfig, table: RunTable, stats: BenchmarkStats, out: Path) -> dict[str, str]:
    """Write the plots the finished runs allow; return ``{title: file name}`` for the report."""
    rows = list(table.rows.values())
    plots: dict[str, str] = {}
    metrics = [*stats.metrics, *stats.explanation_metrics]
    if metrics:
        plot_boxplots(rows, stats.arms, metrics, out / "boxplots.png")
        plots["Box plots per metric (each point a run)"] = "boxplots.png"
    done = {k: r for k, r in table.rows.items() if r["status"] == "done"}
    logs = {k: read_run_log(cfg.work_dir / str(r["run_dir"])) for k, r in done.items()}
    if any(logs.values()):
        plot_learning_curves(logs, stats.arms, cfg.curve_metric, out / "learning_curves.png")
        plots["Learning curves (each line a run)"] = "learning_curves.png"
    pair = heatmap_pair(cfg, done, stats.arms)
    if pair:
        (fold, seed), images = pair
        split = {**DEFAULT_EXPLAIN, **cfg.explain}["split"]
        plot_heatmaps(
            images, out / "heatmaps.png", f"fold {fold}, seed {seed}: the same {split} images, per arm"
        )
        plots["Heatmaps of the same images, per arm"] = "heatmaps.png"
    return plots


def heatmap_pair(cfg: BenchmarkConfig, done: dict[RunKey, dict], arms: list[str]):
    """The first (fold, seed) where every arm finished and wrote heatmaps: ``((fold, seed), {arm: png})``."""
    for repeat, fold, seed in sorted({(k.repeat, k.fold, k.seed) for k in done}):
        images = {}
        for arm in arms:
            key = RunKey(fold, seed, arm, repeat)
            found = find_heatmap(cfg.work_dir / str(done[key]["run_dir"])) if key in done else None
            if found is not None:
                images[arm] = found
        if len(images) == len(arms):
            return (fold, seed), images
    return None


def _write_stats_json(path: Path, stats: BenchmarkStats) -> None:
    from stda_hf.core.fileio import write_json

    def clean(x: Any) -> Any:
        return None if isinstance(x, float) and not math.isfinite(x) else x

    write_json(
        path,
        {
            "baseline": stats.baseline,
            "unit": "fold (seeds averaged within each fold)",
            "primary": {"arm": stats.primary[0], "metric": stats.primary[1]},
            "folds": stats.folds,
            "alpha": stats.alpha,
            "runs": {"done": stats.n_done, "failed": stats.n_failed},
            "summaries": [{k: clean(v) for k, v in asdict(s).items()} for s in stats.summaries.values()],
            "tests": [{k: clean(v) for k, v in asdict(t).items()} for t in stats.tests],
        },
    )
