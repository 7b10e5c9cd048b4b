"""Benchmark statistics, pure functions of the run table: per-arm summaries, seed spread, paired tests."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ALPHA, EXPLANATION_METRICS, METRICS

logger = logging.getLogger(__name__)


@dataclass
class ArmSummary:
    """One metric of one arm over its finished runs."""

    arm: str
    metric: str
    n: int  # finished runs with a finite value
    mean: float
    sd: float  # over all runs (folds and seeds): data and run-to-run variation together
    seed_sd: float  # pooled within-fold SD across seeds: run-to-run spread on the same data (repeatability)
    seed_dof: int  # degrees of freedom of seed_sd (runs minus folds, over folds with two seeds or more)
    minimum: float
    maximum: float


@dataclass
class PairedTest:
    """Wilcoxon signed-rank test of one arm against the baseline on one metric, paired by (fold, seed)."""

    arm: str
    metric: str
    n: int  # complete pairs
    n_nonzero: int  # pairs whose difference is not zero (the test ranks only these)
    mean_diff: float  # arm - baseline
    median_diff: float
    statistic: float  # Wilcoxon W (the smaller rank sum); nan when not computable
    p_value: float  # two-sided; nan when not computable
    rank_biserial: float  # matched-pairs rank-biserial correlation in [-1, 1]; nan without nonzero pairs
    min_p: float  # smallest two-sided p attainable with n_nonzero pairs
    p_holm: float = float("nan")  # Holm-adjusted over every test of the report
    note: str = ""  # why a figure is missing or cannot be significant


def values_by_pair(rows: list[dict[str, Any]], arm: str, metric: str) -> dict[tuple[int, int], float]:
    """``{(fold, seed): value}`` of one arm's finished runs that have a finite ``metric``."""
    out = {}
    for r in rows:
        v = r.get(metric)
        if r["arm"] == arm and r["status"] == "done" and isinstance(v, (int, float)) and math.isfinite(v):
            out[(int(r["fold"]), int(r["seed"]))] = float(v)
    return out


def seed_spread(values: dict[tuple[int, int], float]) -> tuple[float, int]:
    """Pooled within-fold standard deviation across seeds and its degrees of freedom (nan, 0 without repeats).

    The square root of the degrees-of-freedom-weighted mean of each fold's variance across seeds: how much a
    result moves when only the seed changes, with the data held fixed.
    """
    by_fold: dict[int, list[float]] = {}
    for (fold, _seed), v in values.items():
        by_fold.setdefault(fold, []).append(v)
    groups = [np.asarray(v) for v in by_fold.values() if len(v) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    if dof == 0:
        return float("nan"), 0
    return float(math.sqrt(sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / dof)), dof


def equal_spread_band(dof_a: int, dof_b: int, level: float = 0.95) -> tuple[float, float]:
    """The range of SD ratios ``a / b`` that two equally spread arms give with probability ``level``.

    Under normal errors the ratio of the pooled variances follows an F distribution with ``(dof_a, dof_b)``
    degrees of freedom; the band is the square root of its central ``level`` interval.
    """
    from scipy.stats import f

    if dof_a < 1 or dof_b < 1:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2
    return float(math.sqrt(f.ppf(tail, dof_a, dof_b))), float(math.sqrt(f.ppf(1 - tail, dof_a, dof_b)))


def summarize_arm(rows: list[dict[str, Any]], arm: str, metric: str) -> ArmSummary:
    """Mean, SD, seed-to-seed spread and range of one arm's ``metric``."""
    values = values_by_pair(rows, arm, metric)
    x = np.asarray(list(values.values()), dtype=float)
    seed_sd, seed_dof = seed_spread(values)
    nan = float("nan")
    return ArmSummary(
        arm=arm,
        metric=metric,
        n=len(x),
        mean=float(x.mean()) if len(x) else nan,
        sd=float(x.std(ddof=1)) if len(x) >= 2 else nan,
        seed_sd=seed_sd,
        seed_dof=seed_dof,
        minimum=float(x.min()) if len(x) else nan,
        maximum=float(x.max()) if len(x) else nan,
    )


def rank_biserial(diffs: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of paired differences (zeros dropped), in [-1, 1].

    ``(R+ - R-) / (R+ + R-)`` with ranks of ``|d|`` (ties averaged): 1 when every nonzero difference is
    positive, -1 when every one is negative, 0 when they balance; nan when there is no nonzero difference.
    """
    from scipy.stats import rankdata

    d = np.asarray(diffs, dtype=float)
    d = d[d != 0]
    if len(d) == 0:
        return float("nan")
    ranks = rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def paired_test(arm_values: dict, base_values: dict, arm: str = "", metric: str = "") -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of ``arm - baseline`` over the pairs both have, with effect size.

    Zero differences are dropped (Wilcoxon's method) and counted. With no nonzero pair the test is not
    computed (p is nan and the note says why); with few pairs the note gives the smallest attainable p.
    """
    from scipy.stats import wilcoxon

    pairs = sorted(set(arm_values) & set(base_values))
    d = np.asarray([arm_values[p] - base_values[p] for p in pairs], dtype=float)
    nonzero = int(np.count_nonzero(d))
    nan = float("nan")
    min_p = min(1.0, 2.0 / 2**nonzero) if nonzero else 1.0
    test = PairedTest(arm, metric, len(d), nonzero, nan, nan, nan, nan, rank_biserial(d), min_p)
    if len(d) == 0:
        test.note = "no complete pairs with the baseline"
        return test
    test.mean_diff, test.median_diff = float(d.mean()), float(np.median(d))
    if nonzero == 0:
        test.note = f"all {len(d)} differences are zero: no evidence of any difference"
        return test
    result = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    test.statistic, test.p_value = float(result.statistic), float(result.pvalue)
    if min_p > ALPHA:
        test.note = f"{nonzero} nonzero pairs: p cannot go below {min_p:.3g}, so p < {ALPHA} is impossible"
    elif nonzero < len(d):
        test.note = f"{len(d) - nonzero} zero differences dropped"
    return test


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan entries stay nan and do not count in the family)."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass
class BenchmarkStats:
    """Everything the report states: per-arm summaries and paired tests against the baseline."""

    arms: list[str]
    baseline: str
    metrics: list[str]  # test metrics present in the table
    explanation_metrics: list[str]  # explanation numbers present in the table
    summaries: dict[tuple[str, str], ArmSummary]  # (arm, metric) -> summary
    tests: list[PairedTest]  # every non-baseline arm x test metric, Holm-adjusted together
    n_done: int
    n_failed: int


def compute_stats(
    rows: list[dict[str, Any]], arms: list[str], baseline: str, explanation_metrics=EXPLANATION_METRICS
) -> BenchmarkStats:
    """Summaries of every arm and metric, and the paired tests of each arm against ``baseline``.

    ``explanation_metrics`` are summarised per arm where the table has them; only the test metrics are tested.
    """
    present = {k for r in rows if r.get("status") == "done" for k, v in r.items() if v is not None}
    metrics = [m for m in METRICS if m in present]
    explanation = [m for m in explanation_metrics if m in present]
    summaries = {(a, m): summarize_arm(rows, a, m) for a in arms for m in (*metrics, *explanation)}
    tests = [
        paired_test(values_by_pair(rows, a, m), values_by_pair(rows, baseline, m), a, m)
        for a in arms
        if a != baseline
        for m in metrics
    ]
    for t, p in zip(tests, holm([t.p_value for t in tests]), strict=True):
        t.p_holm = p
    return BenchmarkStats(
        arms=list(arms),
        baseline=baseline,
        metrics=metrics,
        explanation_metrics=explanation,
        summaries=summaries,
        tests=tests,
        n_done=sum(r["status"] == "done" for r in rows),
        n_failed=sum(r["status"] == "failed" for r in rows),
    )
