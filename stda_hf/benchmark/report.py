"""The benchmark report in Markdown: results, repeatability, tests, caveats, protocol and folds."""

from __future__ import annotations

import logging
import math
from typing import Any

from .config import ALPHA, DEFAULT_EXPLAIN, METRIC_TITLES, SPLIT_ORDER, BenchmarkConfig
from .stats import BenchmarkStats, equal_spread_band

logger = logging.getLogger(__name__)


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _title(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric.replace("_", " "))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def results_table(stats: BenchmarkStats, metrics: list[str]) -> list[str]:
    """Markdown rows: per arm, ``mean ± SD`` of each metric and the number of runs."""
    rows = []
    for arm in stats.arms:
        cells = [f"{_fmt(s.mean)} ± {_fmt(s.sd)}" for s in (stats.summaries[(arm, m)] for m in metrics)]
        n = max((stats.summaries[(arm, m)].n for m in metrics), default=0)
        rows.append([f"**{arm}**" if arm == stats.baseline else arm, str(n), *cells])
    return _table(["arm", "runs", *(_title(m) for m in metrics)], rows)


def repeatability_table(stats: BenchmarkStats) -> list[str]:
    """Markdown rows: per arm, the seed-to-seed SD of each metric and its ratio to the baseline's."""
    rows = []
    for arm in stats.arms:
        cells = []
        for m in stats.metrics:
            own, base = stats.summaries[(arm, m)].seed_sd, stats.summaries[(stats.baseline, m)].seed_sd
            ratio = own / base if math.isfinite(own) and math.isfinite(base) and base > 0 else float("nan")
            cells.append(_fmt(own) if arm == stats.baseline else f"{_fmt(own)} (×{_fmt(ratio, 2)})")
        rows.append([arm, *cells])
    return _table(["arm", *(_title(m) for m in stats.metrics)], rows)


def tests_table(stats: BenchmarkStats) -> list[str]:
    """Markdown rows: one paired test per arm and metric."""
    rows = [
        [
            t.arm,
            _title(t.metric),
            f"{t.n} ({t.n_nonzero})",
            f"{t.mean_diff:+.3f}" if math.isfinite(t.mean_diff) else "n/a",
            f"{t.median_diff:+.3f}" if math.isfinite(t.median_diff) else "n/a",
            _fmt(t.statistic, 1),
            _p(t.p_value),
            _p(t.p_holm),
            f"{t.rank_biserial:+.2f}" if math.isfinite(t.rank_biserial) else "n/a",
            t.note,
        ]
        for t in stats.tests
    ]
    header = [
        "arm",
        "metric",
        "pairs (nonzero)",
        "mean Δ",
        "median Δ",
        "W",
        "p",
        "p Holm",
        "r (rank-biserial)",
    ]
    return _table([*header, "note"], rows)


def caveats(stats: BenchmarkStats) -> list[str]:
    """Automatic cautions: how many pairs, what p can reach, how many tests, failed runs."""
    lines = []
    n_pairs = max((t.n for t in stats.tests), default=0)
    if stats.tests:
        floor = min(1.0, 2.0 / 2**n_pairs) if n_pairs else 1.0
        lines.append(
            f"- Each paired test has at most {n_pairs} pairs (folds × seeds); the smallest two-sided p a Wilcoxon "
            f"test can give with {n_pairs} pairs is {floor:.3g}."
            + (" Significance at 0.05 is out of reach by construction." if floor > ALPHA else "")
        )
        lines.append(
            f"- {len(stats.tests)} tests are reported; `p Holm` corrects for all of them together. Pairs share "
            "folds (the same test images across seeds), so they are not fully independent and p is optimistic."
        )
        lines.append(
            "- Δ is arm minus baseline; r (rank-biserial) is +1 when the arm wins every pair, -1 when it loses "
            "every pair, 0 when wins and losses balance."
        )
    lines.append(
        "- Repeatability is the pooled within-fold SD across seeds (same data, different seed); a ratio below "
        "1 means the arm's runs agree more closely than the baseline's."
    )
    lines += _spread_caveat(stats)
    if stats.n_failed:
        lines.append(
            f"- {stats.n_failed} run(s) failed and are left out (see below); pairs missing a run drop."
        )
    return lines


def _spread_caveat(stats: BenchmarkStats) -> list[str]:
    """How far SD ratios stray by chance alone with the seed repeats the table has (F distribution)."""
    others = [a for a in stats.arms if a != stats.baseline]
    if not stats.metrics or not others:
        return []
    metric = stats.metrics[0]
    dof_base = stats.summaries[(stats.baseline, metric)].seed_dof
    dof_arm = max(stats.summaries[(a, metric)].seed_dof for a in others)
    lo, hi = equal_spread_band(dof_arm, dof_base)
    if not math.isfinite(lo):
        return ["- No fold has two finished seeds yet, so there is no repeatability figure."]
    return [
        f"- The seed SDs rest on {dof_arm} and {dof_base} degrees of freedom: two arms with truly equal spread give "
        f"SD ratios between {lo:.2f} and {hi:.2f} 95% of the time, so only ratios outside that band say anything."
    ]


def render_report(
    cfg: BenchmarkConfig,
    stats: BenchmarkStats,
    fold_info: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    plots: dict[str, str],
    reading: str = "",
    config_path: str = "",
) -> str:
    """The Markdown report: protocol, results, repeatability, paired tests, explanations, plots, runs, reading."""
    cmd = f"python benchmarks/stda_benchmark.py --config {config_path or '<config>.yaml'}"
    lines = [f"# ST-DA benchmark: {cfg.name}", "", f"Reproduce or extend (it resumes): `{cmd}`", ""]
    lines += _protocol_section(cfg, fold_info)
    lines += ["", f"## Results on the test folds (mean ± SD over runs, {stats.n_done} finished runs)", ""]
    lines += results_table(stats, stats.metrics) if stats.metrics else ["No finished runs yet."]
    if stats.metrics:
        lines += ["", "## Repeatability: seed-to-seed SD (ratio to the baseline's)", ""]
        lines += repeatability_table(stats)
    if stats.tests:
        lines += [
            "",
            f"## Paired tests against `{stats.baseline}` (Wilcoxon signed-rank over folds × seeds)",
            "",
        ]
        lines += tests_table(stats)
    if stats.explanation_metrics:
        explain = {**DEFAULT_EXPLAIN, **cfg.explain}
        what = f"`{explain['method']}` on the first {explain['limit'] or 'all'} {explain['split']} images of each fold"
        lines += ["", f"## Explanations ({what}; share of positive relevance, mean ± SD)", ""]
        lines += results_table(stats, stats.explanation_metrics)
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({path})" for title, path in plots.items()] or ["No plots (no finished runs)."]
    lines += [
        "",
        "## Runs",
        "",
        f"Every run, with its metrics and errors: [runs.csv](runs.csv). Failed: {len(failed)}.",
    ]
    lines += [
        f"- {r['arm']} fold {r['fold']} seed {r['seed']}: {r.get('error') or 'no message'}" for r in failed
    ]
    lines += ["", "## Caveats (automatic)", "", *caveats(stats), "", "## Reading", ""]
    lines += [reading.strip() or "No reading written yet: put one in `reading.md` beside this report."]
    return "\n".join(lines) + "\n"


def _protocol_section(cfg: BenchmarkConfig, fold_info: list[dict[str, Any]]) -> list[str]:
    data = cfg.real or f"phantoms {_settings(cfg.phantoms) or '(defaults)'}"
    lines = ["## Protocol", "", f"- Data: {data}"]
    if cfg.shortcut:
        lines.append(f"- Planted shortcut: {_settings(cfg.shortcut)}")
    lines += [
        f"- {cfg.folds} folds grouped by lesion, patient and near-duplicates (fold seed {cfg.fold_seed}; "
        f"validation {cfg.val:.0%} of the images), × seeds {list(cfg.seeds)}; validation and test real only",
        *(f"- Arm `{a}`: {_settings(s) or 'train settings only'}" for a, s in cfg.arms.items()),
        f"- Shared training settings: {_settings(cfg.train) or 'train.py defaults'}",
        f"- Teacher (per fold, real train images only): {_settings(cfg.teacher) or 'train.py defaults'}",
        f"- Style transfer (per fold, train images only): {_settings(cfg.generate) or 'defaults'}",
        f"- Pseudo-labels: {_settings(cfg.label) or 'defaults'}",
    ]
    if fold_info:
        lines += ["", *_fold_table(fold_info)]
    return lines


def _fold_table(fold_info: list[dict[str, Any]]) -> list[str]:
    rows = []
    for info in fold_info:
        counts = info.get("counts", {})
        cells = [
            f"{counts.get(s, {}).get('benign', 0)}/{counts.get(s, {}).get('malignant', 0)}"
            for s in SPLIT_ORDER
        ]
        synthetic = info.get("synthetic", {})
        rows.append(
            [
                str(info.get("fold")),
                *cells,
                str(synthetic.get("images", "")),
                str(synthetic.get("kept", "")),
                str(synthetic.get("malignant", "")),
                info.get("error", ""),
            ]
        )
    header = ["fold", "train b/m", "validation b/m", "test b/m", "synthetic", "kept", "labelled malignant"]
    return _table([*header, "error"], rows)


def _settings(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
