"""The benchmark report in Markdown: results, repeatability, tests, caveats, protocol and folds."""

from __future__ import annotations

import logging
import math
from typing import Any

from stda_hf.benchmark.config import (
    ALPHA,
    DEFAULT_EXPLAIN,
    METRIC_TITLES,
    RELIANCE_METRICS,
    SPLIT_ORDER,
    BenchmarkConfig,
    arm_uses_synthetic,
    synthetic_recipe,
)
from stda_hf.benchmark.stats import (
    T_TEST,
    BenchmarkStats,
    FoldTest,
    detectable_difference,
    equal_spread_band,
    fold_test_validity,
    smallest_p,
)

logger = logging.getLogger(__name__)


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _title(metric: str) -> str:
    if metric.startswith("untrained_"):
        return "untrained: " + _title(metric.removeprefix("untrained_"))
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


def _delta(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else "n/a"


def _interval(t: FoldTest) -> str:
    return f"[{_delta(t.ci_low)}, {_delta(t.ci_high)}]" if math.isfinite(t.ci_low) else "n/a"


def tests_table(stats: BenchmarkStats) -> list[str]:
    """Markdown rows: one fold-level test per compared arm and metric, the primary endpoint first."""
    level = f"{1 - stats.alpha:.0%}"
    ordered = sorted(stats.tests, key=lambda t: not t.primary)
    rows = [
        [
            f"**{t.arm}**" if t.primary else t.arm,
            f"**{_title(t.metric)}** (primary)" if t.primary else _title(t.metric),
            f"{t.units} ({t.runs})",
            _delta(t.mean_diff),
            _interval(t),
            f"{_fmt(t.statistic, 2)} ({t.dof})",
            _p(t.p_value),
            "primary" if t.primary else _p(t.p_adjusted),
            _exact_p(t.sign_flip_p, t, stats.alpha),
            _exact_p(t.wilcoxon_p, t, stats.alpha),
            "; ".join(t.notes),
        ]
        for t in ordered
    ]
    header = [
        "arm",
        "metric",
        "folds (runs)",
        "mean Δ",
        f"{level} CI",
        "t (df)",
        "p",
        "p Holm",
        "sign-flip p",
        "Wilcoxon p",
        "note",
    ]
    return _table(header, rows)


def _exact_p(p: float, t: FoldTest, alpha: float) -> str:
    """An exact permutation p, or "cannot reject at k = n" when n folds cannot reach ``alpha`` at all."""
    if t.repeats == 1 and t.units and smallest_p(t.units) > alpha:
        return f"cannot reject at k = {t.units} ({_p(p)})"
    return _p(p)


def unit_of_analysis(stats: BenchmarkStats) -> list[str]:
    """The paragraph that says what one observation is and which test is used."""
    repeats = max((t.repeats for t in stats.tests), default=1)
    method = next((t.method for t in stats.tests), T_TEST)
    lines = [
        f"The unit of analysis is the fold: seeds within a fold share its test images, teacher and synthetic set, "
        f"so each fold contributes one number, the mean over its seeds of arm minus `{stats.baseline}`. "
        f"{stats.folds} folds × {repeats} cross-validation repetition(s); test: {method}."
    ]
    if repeats > 1:
        lines.append(
            "Repetitions reuse the same images, so the variance of the mean is inflated by the Nadeau-Bengio "
            "factor (1/(r·k) + 1/(k-1)) with df = r·k - 1 (Bouckaert & Frank 2004); this correction is "
            "conservative, and it keeps the interval wider than the naive one however many repetitions are added."
        )
    else:
        lines.append(
            "The exact sign-flip test over whole folds and the exact Wilcoxon test (zeros dropped) stand beside "
            "the t-test: they need no normality, but with few folds they cannot reach small p."
        )
    return [" ".join(lines)]


def primary_line(stats: BenchmarkStats, cfg: BenchmarkConfig, declaration: dict[str, Any]) -> list[str]:
    """The primary endpoint's result, whether it was declared before the runs, the test's validity and power."""
    arm, metric = stats.primary
    t = stats.primary_test
    if t is None or not math.isfinite(t.mean_diff):
        return [
            f"Primary endpoint: `{arm}` vs `{stats.baseline}` on {_title(metric)}: no finished pairs yet."
        ]
    level = f"{1 - stats.alpha:.0%}"
    verdict = "reaches" if math.isfinite(t.p_value) and t.p_value < stats.alpha else "does not reach"
    lines = [
        f"Primary endpoint, {_declared(stats, declaration)}: `{arm}` minus `{stats.baseline}` on {_title(metric)}: "
        f"Δ = {_delta(t.mean_diff)}, {level} CI {_interval(t)}, t({t.dof}) = {_fmt(t.statistic, 2)}, "
        f"p = {_p(t.p_value)} ({verdict} α = {stats.alpha:g}).",
    ]
    lines += ["", *validity_line(t, stats.alpha), "", *power_line(t, cfg, stats.alpha)]
    return lines


def _declared(stats: BenchmarkStats, declaration: dict[str, Any]) -> str:
    """ "declared before the runs" only when the record says so; otherwise what the record does say."""
    arm, metric = stats.primary
    if not declaration:
        return "not recorded before the runs (this benchmark predates the declaration record)"
    same = (declaration.get("arm"), declaration.get("metric")) == (arm, metric)
    if not same:
        return (
            f"changed after the declaration (declared: `{declaration.get('arm')}` on "
            f"{_title(str(declaration.get('metric')))}, {declaration.get('declared_at')})"
        )
    done = int(declaration.get("runs_done") or 0)
    if done:
        return f"declared after {done} run(s) had finished ({declaration.get('declared_at')})"
    return f"declared before the runs ({declaration.get('declared_at')})"


def validity_line(t: FoldTest, alpha: float) -> list[str]:
    """How often the fold t-test rejects a true null at this many folds (simulated), when it is the one used."""
    if t.repeats != 1 or t.units < 2:
        return []
    rates = fold_test_validity(t.units, alpha)
    return [
        f"Validity at k = {t.units} (4,000 simulated benchmarks with no true effect): the fold t-test rejects "
        f"{rates['normal']:.1%} with normal fold effects, {rates['skewed']:.1%} with skewed ones and "
        f"{rates['correlated']:.1%} when folds correlate at 1/k, against a nominal {alpha:.0%}; read p values near "
        f"α with that in mind."
    ]


def power_line(t: FoldTest, cfg: BenchmarkConfig, alpha: float) -> list[str]:
    """The smallest effect the design detects with 80% power, from the prior SD stated before the runs."""
    ratio = 1.0 / (cfg.folds - 1) if t.repeats > 1 and cfg.folds > 1 else 0.0
    detectable = detectable_difference(cfg.prior_fold_sd, t.units, ratio, alpha)
    if not math.isfinite(detectable):
        return [
            "Power: no prior SD of fold differences was stated (`prior_fold_sd`), so no power figure is given; the "
            "spread these runs happen to show is too noisy at few folds to stand in for one."
        ]
    source = f" ({cfg.prior_source})" if cfg.prior_source else ""
    return [
        f"Power: with the stated SD of fold differences {cfg.prior_fold_sd:g}{source}, this design detects a true "
        f"|Δ| of {_fmt(detectable)} or more in 80% of benchmarks at α = {alpha:g} (two-sided); smaller true "
        "effects are likely to go unseen. More folds or repetitions, or more seeds per fold, lower it."
    ]


def caveats(stats: BenchmarkStats) -> list[str]:
    """Automatic cautions: what the tests can reach, how many tests, failed runs, the spread band."""
    lines = []
    if stats.tests:
        units = max((t.units for t in stats.tests), default=0)
        floor = smallest_p(units) if units else 1.0
        lines.append(
            f"- Each test has at most {units} folds; the smallest two-sided p the sign-flip test can give with "
            f"{units} folds is {floor:.3g}."
            + (
                " Distribution-free significance at 0.05 is out of reach by construction."
                if floor > ALPHA
                else ""
            )
        )
        lines.append(
            f"- One primary endpoint; the other {len(stats.tests) - 1} comparisons are secondary and `p Holm` "
            "corrects them as one family. Explanation numbers are tested like the metrics (as secondaries); "
            "the untrained model's shares and the areas are reference levels, shown, not tested."
        )
        lines.append("- Δ is arm minus baseline; the interval comes from the same t as p.")
    lines.append(
        "- Repeatability is the pooled within-fold SD across seeds (same data, different seed); a ratio below "
        "1 means the arm's runs agree more closely than the baseline's."
    )
    lines += _spread_caveat(stats)
    if stats.n_failed:
        lines.append(
            f"- {stats.n_failed} run(s) failed and are left out (see below); a fold keeps the seeds both arms finished."
        )
    return lines


def _has_seed_spread(stats: BenchmarkStats) -> bool:
    """Whether some fold has two finished seeds of some arm: else every repeatability cell would be n/a."""
    return any(math.isfinite(stats.summaries[(a, m)].seed_sd) for a in stats.arms for m in stats.metrics)


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
        return [
            "- No fold has two finished seeds, so there is no repeatability figure "
            "(a second seed in the config adds one)."
        ]
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
    declaration: dict[str, Any] | None = None,
) -> str:
    """The Markdown report: protocol, results, repeatability, paired tests, explanations, plots, runs, reading."""
    cmd = f"python benchmarks/stda_benchmark.py --config {config_path or '<config>.yaml'}"
    lines = [f"# ST-DA benchmark: {cfg.name}", "", f"Reproduce or extend (it resumes): `{cmd}`", ""]
    lines += _protocol_section(cfg, fold_info)
    lines += ["", f"## Results on the test folds (mean ± SD over runs, {stats.n_done} finished runs)", ""]
    lines += results_table(stats, stats.metrics) if stats.metrics else ["No finished runs yet."]
    if stats.metrics:
        lines += ["", "## Repeatability: seed-to-seed SD (ratio to the baseline's)", ""]
        lines += repeatability_table(stats) if _has_seed_spread(stats) else _spread_caveat(stats)
    if stats.tests:
        lines += ["", f"## Tests against `{stats.baseline}`, the fold as the unit", ""]
        lines += unit_of_analysis(stats)
        lines += ["", *primary_line(stats, cfg, declaration or {}), ""]
        lines += tests_table(stats)
    reliance = [m for m in stats.explanation_metrics if m in RELIANCE_METRICS]
    shares = [m for m in stats.explanation_metrics if m not in RELIANCE_METRICS]
    if reliance:
        artifact = cfg.shortcut.get("artifact", "artifact")
        lines += ["", f"## Reliance on the {artifact}, by intervention (mean ± SD)", ""]
        lines += [
            f"Each held-out test image of a fold is rendered without and with the {artifact}, nothing else changed; "
            f"`reliance` is the mean change of the malignant log-odds the {artifact} causes, in SDs of the "
            f"model's own log-odds (0: the model ignores it; below 0: the {artifact} reads as benign). ROC AUC "
            f"`clean` has no image carrying it, `reversed` has it on the malignant images only.",
            "",
        ]
        lines += results_table(stats, reliance)
    if shares:
        explain = {**DEFAULT_EXPLAIN, **cfg.explain}
        target = explain.get("target", "predicted")
        same = (
            "the same images and target for every arm"
            if target != "predicted"
            else "the same images, but each model's own predicted class: not a fixed target"
        )
        what = (
            f"`{explain['method']}` explaining the {target} class ({explain.get('output', 'log_odds')}) on the "
            f"first {explain['limit'] or 'all'} {explain['split']} images of each fold, {same}"
        )
        lines += ["", f"## Explanations ({what}; share of positive relevance, mean ± SD)", ""]
        lines += results_table(stats, [*shares, *stats.area_metrics])
        lines += [
            "",
            "A share is read against the same share of an untrained model of the same architecture (`untrained "
            "...`: what the method shows for a network that learned nothing) and against its region's area; only "
            "differences from that reference, and between arms on the same images, say anything.",
        ]
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
    arm, metric = cfg.primary_endpoint
    lines += [
        f"- {cfg.folds} folds grouped by lesion, patient and near-duplicates (fold seeds {cfg.cv_seeds}: "
        f"{len(cfg.cv_seeds)} repetition(s); validation {cfg.val:.0%} of the images), × seeds {list(cfg.seeds)}; "
        "validation and test real only",
        f"- Primary endpoint: `{arm}` vs `{cfg.baseline}` on {_title(metric)}; α = {cfg.alpha:g}",
        *(f"- Arm `{a}`: {_settings(s) or 'train settings only'}" for a, s in cfg.arms.items()),
        f"- Shared training settings: {_settings(cfg.train) or 'train.py defaults'}",
        f"- Teacher (per fold, real train images only): {_settings(cfg.teacher) or 'train.py defaults'}",
        f"- Style transfer (per fold, train images only): {_settings(cfg.generate) or 'defaults'}",
        f"- Pseudo-labels: {_settings(cfg.label) or 'defaults'}",
        *(
            f"- Arm `{a}` has its own synthetic set `{synthetic_recipe(cfg, a)}` (same folds, same teacher)"
            for a in cfg.arms
            if synthetic_recipe(cfg, a)
        ),
        f"- Explanations: {_settings({**DEFAULT_EXPLAIN, **cfg.explain}) if cfg.explain else 'off'}",
    ]
    if fold_info:
        lines += ["", *_fold_table(fold_info, _set_users(cfg))]
    return lines


def _set_users(cfg: BenchmarkConfig) -> dict[str, list[str]]:
    """``{synthetic set folder name: the arms that train on it}``, so the fold table names arms, not hashes."""
    users: dict[str, list[str]] = {}
    for arm, settings in cfg.arms.items():
        if arm_uses_synthetic(settings):
            recipe = synthetic_recipe(cfg, arm)
            users.setdefault(f"synthetic-{recipe}" if recipe else "synthetic", []).append(arm)
    return users


def _fold_table(fold_info: list[dict[str, Any]], users: dict[str, list[str]] | None = None) -> list[str]:
    rows = []
    shortcut = any("with_shortcut" in v for i in fold_info for v in i.values() if isinstance(v, dict))
    for info in fold_info:
        counts = info.get("counts", {})
        cells = [
            f"{counts.get(s, {}).get('benign', 0)}/{counts.get(s, {}).get('malignant', 0)}"
            for s in SPLIT_ORDER
        ]
        sets = {k: v for k, v in info.items() if k.startswith("synthetic") and isinstance(v, dict)} or {
            "": {}
        }
        for name, synthetic in sets.items():
            row = [
                f"{info.get('repeat', 0)}/{info.get('fold')}",
                *cells,
                f"{name} ({', '.join(users[name])})" if users and users.get(name) else name,
                str(synthetic.get("images", "")),
                str(synthetic.get("kept", "")),
                str(synthetic.get("malignant", "")),
            ]
            if shortcut:
                row.append(_share_cell(synthetic))
            rows.append([*row, info.get("error", "")])
    header = [
        "repetition/fold",
        "train b/m",
        "validation b/m",
        "test b/m",
        "synthetic set",
        "images",
        "kept",
        "labelled malignant",
    ]
    if shortcut:
        header.append("with the shortcut: labelled malignant (kept)")
    return _table([*header, "error"], rows)


def _share_cell(synthetic: dict[str, Any]) -> str:
    n, share = synthetic.get("with_shortcut"), synthetic.get("with_shortcut_malignant_share")
    kept = synthetic.get("with_shortcut_kept_malignant_share")
    if not n:
        return "none carry it"
    return f"{_fmt(share, 2)} of {n} ({_fmt(kept, 2) if kept is not None else 'n/a'})"


def _settings(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
