"""Benchmark statistics, pure functions of the run table: the fold is the unit of analysis.

Seeds within a fold share its test images, its teacher and its synthetic set, so the paired differences of two
arms over (fold, seed) pairs are correlated, and a test that counts them as independent rejects far too often
(a Wilcoxon over 5 folds x 5 seeds rejects a true null in about 27% of benchmarks when the fold effect is as
large as the seed noise). Here every fold (one partition of the data into train and test, for one
``fold_seed`` repetition) gives one number, the mean over its seeds of ``arm - baseline``, and the tests run over
those numbers:

- one repetition of k-fold cross-validation: a one-sample t-test on the k fold means (df = k - 1), with the
  exact sign-flip permutation test over whole folds beside it (distribution-free; its smallest p is
  ``2 / 2**k``) and the exact Wilcoxon signed-rank test (zeros dropped explicitly);
- r repetitions (several ``fold_seeds``): the corrected repeated k-fold cv test of Bouckaert & Frank (2004),
  the Nadeau & Bengio (2003) variance factor ``1/(r k) + n_test/n_train = 1/(r k) + 1/(k - 1)`` with
  df = r k - 1, because the repetitions reuse the same images and their folds are not independent.

One endpoint (an arm and a metric, ``primary`` in the config) is read against alpha as it stands; every other
(arm, metric) test is secondary, Holm-adjusted as one family. The seed-to-seed spread (repeatability) is
summarised per arm beside the tests.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import t as student

from stda_hf.benchmark.config import ALPHA, EXPLANATION_METRICS, METRICS

logger = logging.getLogger(__name__)

POWER = 0.8
"""Power of the detectable-difference line: the difference the design finds in 80% of benchmarks."""

EXACT_SIGN_FLIP_MAX = 16
"""Above this many folds the sign-flip distribution is sampled instead of enumerated."""

T_TEST = "t-test over fold means"
CORRECTED_T_TEST = "corrected repeated k-fold t-test (Bouckaert & Frank, Nadeau & Bengio)"


# ----------------------------------------------------------------------------------------------------------------
# Per-arm summaries and the seed spread


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


def values_by_pair(rows: list[dict[str, Any]], arm: str, metric: str) -> dict[tuple[int, int, int], float]:
    """``{(repeat, fold, seed): value}`` of one arm's finished runs that have a finite ``metric``.

    ``repeat`` indexes the cross-validation repetition (``fold_seeds``); tables without the column are one
    repetition (0).
    """
    out = {}
    for r in rows:
        v = r.get(metric)
        if r["arm"] == arm and r["status"] == "done" and isinstance(v, (int, float)) and math.isfinite(v):
            out[(int(r.get("repeat") or 0), int(r["fold"]), int(r["seed"]))] = float(v)
    return out


def _unit(key: tuple) -> tuple[int, int]:
    """The fold (``(repeat, fold)``) a ``(repeat, fold, seed)`` or ``(fold, seed)`` key belongs to."""
    return (0, int(key[0])) if len(key) == 2 else (int(key[0]), int(key[1]))


def seed_spread(values: Mapping[tuple, float]) -> tuple[float, int]:
    """Pooled within-fold standard deviation across seeds and its degrees of freedom (nan, 0 without repeats).

    The square root of the degrees-of-freedom-weighted mean of each fold's variance across seeds: how much a
    result moves when only the seed changes, with the data held fixed.
    """
    by_fold: dict[tuple[int, int], list[float]] = {}
    for key, v in values.items():
        by_fold.setdefault(_unit(key), []).append(v)
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


# ----------------------------------------------------------------------------------------------------------------
# Tests with the fold as the unit


@dataclass
class FoldTest:
    """A test of ``arm - baseline`` on one metric with the fold as the unit."""

    arm: str
    metric: str
    method: str  # T_TEST or CORRECTED_T_TEST
    repeats: int  # CV repetitions (distinct fold seeds) that contributed
    units: int  # folds with both arms finished, over every repetition
    runs: int  # (fold, seed) pairs behind them
    mean_diff: float  # mean over folds of the per-fold mean difference (arm - baseline)
    ci_low: float  # 1 - alpha interval of mean_diff, from the same (corrected) t
    ci_high: float
    statistic: float  # t
    dof: int
    p_value: float  # two-sided
    sign_flip_p: float  # exact (or sampled) two-sided sign-flip p over whole folds; nan with repeats > 1
    min_sign_flip_p: float  # the smallest sign-flip p that many folds can give
    wilcoxon_p: float  # exact two-sided Wilcoxon signed-rank p over the fold means, zeros dropped
    primary: bool = False
    p_adjusted: float = float("nan")  # Holm over the secondary family; the primary's own p
    notes: list[str] = field(default_factory=list)


def fold_differences(
    arm_values: Mapping[tuple, float], base_values: Mapping[tuple, float]
) -> tuple[dict[tuple[int, int], float], int]:
    """Per-fold mean of ``arm - baseline`` over the seeds both arms finished, and the count of pairs used.

    Keys of both mappings are ``(repeat, fold, seed)`` (or ``(fold, seed)`` for one repetition); the result is
    keyed by ``(repeat, fold)``.
    """
    by_unit: dict[tuple[int, int], list[float]] = {}
    for key in sorted(set(arm_values) & set(base_values)):
        by_unit.setdefault(_unit(key), []).append(arm_values[key] - base_values[key])
    pairs = sum(len(v) for v in by_unit.values())
    return {u: float(np.mean(v)) for u, v in sorted(by_unit.items())}, pairs


def corrected_t(d: np.ndarray, test_train_ratio: float = 0.0, alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """The (corrected) one-sample t-test of ``mean(d) = 0`` along the last axis, vectorised over the others.

    Parameters
    ----------
    d : ndarray, shape (..., n)
        One value per fold (and repetition); leading axes are independent benchmarks (the simulations).
    test_train_ratio : float
        0 for the plain t-test on one repetition of k-fold; ``n_test / n_train = 1 / (k - 1)`` for repeated
        cross-validation (the Nadeau-Bengio term).
    alpha : float
        Two-sided level of the interval.

    Returns
    -------
    dict of ndarray
        ``t, p, dof, half_width, se`` with the leading shape of ``d``. With n < 2 everything but ``dof`` is nan;
        with zero spread p is 1 for a zero mean and 0 otherwise.
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    dof = max(n - 1, 0)
    shape = d.shape[:-1]
    if n < 2:
        nan = np.full(shape, np.nan)
        return {"t": nan, "p": nan, "dof": dof, "half_width": nan, "se": nan}
    mean = d.mean(axis=-1)
    se = np.sqrt((1.0 / n + test_train_ratio) * d.var(axis=-1, ddof=1))
    t_crit = float(student.ppf(1 - alpha / 2, dof))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(
            se > 0, mean / np.where(se > 0, se, 1.0), np.where(mean == 0, 0.0, np.sign(mean) * np.inf)
        )
    p = np.where(se > 0, 2 * student.sf(np.abs(t), dof), np.where(mean == 0, 1.0, 0.0))
    return {"t": t, "p": p, "dof": dof, "half_width": t_crit * se, "se": se}


def detectable_difference(
    prior_sd: float, units: int, test_train_ratio: float = 0.0, alpha: float = ALPHA
) -> float:
    """The smallest true |mean difference| the fold-level test finds with 80% power, from a *stated* spread.

    ``(t_{1-alpha/2} + t_{0.8}) * prior_sd * sqrt(1/units + test_train_ratio)`` with ``units - 1`` degrees of
    freedom. ``prior_sd`` is the SD of the per-fold differences expected before the runs (from a pilot or prior
    knowledge): a power figure computed from the spread a benchmark happens to observe is noisy with few folds (with
    3 folds it understates the detectable effect by half about a fifth of the time) and circular. nan without a
    prior or with fewer than 2 units.
    """
    if not prior_sd > 0 or units < 2:
        return float("nan")
    dof = units - 1
    factor = float(student.ppf(1 - alpha / 2, dof)) + float(student.ppf(POWER, dof))
    return factor * prior_sd * math.sqrt(1.0 / units + test_train_ratio)


def smallest_p(units: int) -> float:
    """The smallest two-sided p the exact sign-flip (and exact Wilcoxon) test can give with ``units`` folds."""
    return min(1.0, 2.0 / 2**units) if units else float("nan")


def sign_flip_p(d: np.ndarray, n_samples: int = 20000, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip permutation p of ``mean(d)`` along the last axis: exact over all ``2**n`` flips.

    Under the null each fold's difference is symmetric about zero, so flipping its sign leaves the
    distribution unchanged; p is the share of flips whose |mean| reaches the observed one (the identity
    included, so p >= 2 / 2**n). Above :data:`EXACT_SIGN_FLIP_MAX` folds the flips are sampled.
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    if n == 0:
        return np.full(d.shape[:-1], np.nan)
    if n <= EXACT_SIGN_FLIP_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_samples, n))
        signs[0] = 1.0
    observed = np.abs(d.sum(axis=-1))
    tolerance = 1e-9 * np.maximum(1.0, np.abs(d).sum(axis=-1))
    flipped = np.abs(d @ signs.T)  # (..., flips)
    return np.mean(flipped >= (observed - tolerance)[..., None], axis=-1)


def exact_wilcoxon(d: np.ndarray) -> tuple[float, float, int]:
    """Two-sided Wilcoxon signed-rank test with zeros dropped first and the exact null distribution.

    Returns ``(W, p, n_nonzero)``; nan without a nonzero difference. Zeros are removed explicitly (Wilcoxon's
    own method) and the exact method is asked for, so every supported SciPy gives the same p (five positive
    differences and one zero: 0.0625, where SciPy 1.11's default switched to the normal approximation, 0.043).
    With tied |d| SciPy's exact distribution is used conservatively (the statistic rounded away from the
    centre).
    """
    from scipy.stats import wilcoxon

    d = np.asarray(d, dtype=float)
    d = d[d != 0]
    if len(d) == 0:
        return float("nan"), float("nan"), 0
    result = wilcoxon(d, alternative="two-sided", method="exact")
    return float(result.statistic), float(result.pvalue), len(d)


def fold_test(
    arm_values: Mapping[tuple, float],
    base_values: Mapping[tuple, float],
    *,
    folds: int,
    arm: str = "",
    metric: str = "",
    alpha: float = ALPHA,
) -> FoldTest:
    """Test ``arm - baseline`` with the fold as the unit (the module docstring gives the method).

    ``folds`` is k of the k-fold design: with several repetitions the correction's test/train ratio is
    ``1 / (k - 1)``.
    """
    diffs, runs = fold_differences(arm_values, base_values)
    d = np.asarray(list(diffs.values()), dtype=float)
    repeats = len({u[0] for u in diffs})
    ratio = 1.0 / (folds - 1) if repeats > 1 and folds > 1 else 0.0
    result = {k: (v if isinstance(v, int) else float(v)) for k, v in corrected_t(d, ratio, alpha).items()}
    mean = float(d.mean()) if len(d) else float("nan")
    test = FoldTest(
        arm=arm,
        metric=metric,
        method=CORRECTED_T_TEST if repeats > 1 else T_TEST,
        repeats=repeats,
        units=len(d),
        runs=runs,
        mean_diff=mean,
        ci_low=mean - result["half_width"],
        ci_high=mean + result["half_width"],
        statistic=result["t"],
        dof=result["dof"],
        p_value=result["p"],
        sign_flip_p=float(sign_flip_p(d)) if repeats == 1 and len(d) else float("nan"),
        min_sign_flip_p=smallest_p(len(d)),
        wilcoxon_p=exact_wilcoxon(d)[1] if repeats == 1 else float("nan"),
    )
    if len(d) < 2:
        test.notes.append(f"{len(d)} fold(s) with both arms: no test across folds is possible")
    elif repeats == 1 and test.min_sign_flip_p > alpha:
        test.notes.append(
            f"{len(d)} folds: the sign-flip test cannot go below p = {test.min_sign_flip_p:.3g}; "
            "the t-test leans on normal fold differences"
        )
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


def adjust(tests: list[FoldTest], primary: tuple[str, str]) -> None:
    """Mark the primary endpoint ``(arm, metric)`` and Holm-adjust every other test as one secondary family.

    The primary test is its own family: its p is read against alpha as it stands.
    """
    secondary = []
    for test in tests:
        test.primary = (test.arm, test.metric) == tuple(primary)
        if test.primary:
            test.p_adjusted = test.p_value
        else:
            secondary.append(test)
    for test, p in zip(secondary, holm([t.p_value for t in secondary]), strict=True):
        test.p_adjusted = p


# ----------------------------------------------------------------------------------------------------------------
# The whole table


@dataclass
class BenchmarkStats:
    """Everything the report states: per-arm summaries and the fold-level tests against the baseline."""

    arms: list[str]
    baseline: str
    primary: tuple[str, str]  # (arm, metric) of the primary endpoint
    folds: int  # k
    metrics: list[str]  # test metrics present in the table
    explanation_metrics: list[str]  # explanation numbers present in the table (tested as secondaries)
    area_metrics: list[str]  # region sizes beside the explanation numbers (summarised, not tested)
    summaries: dict[tuple[str, str], ArmSummary]  # (arm, metric) -> summary
    tests: list[FoldTest]  # every non-baseline arm x (test and explanation) metric
    n_done: int
    n_failed: int
    alpha: float = ALPHA

    @property
    def primary_test(self) -> FoldTest | None:
        """The primary endpoint's test, or None when its arm or metric has no finished runs."""
        return next((t for t in self.tests if t.primary), None)


def compute_stats(
    rows: list[dict[str, Any]],
    arms: list[str],
    baseline: str,
    explanation_metrics=EXPLANATION_METRICS,
    *,
    primary: tuple[str, str] = ("mix", "roc_auc"),
    folds: int = 0,
    area_metrics=(),
    alpha: float = ALPHA,
) -> BenchmarkStats:
    """Summaries of every arm and metric, and the fold-level tests of each arm against ``baseline``.

    ``folds`` is k (default: the number of distinct folds in the table). Test and explanation metrics are
    tested; ``area_metrics`` (region sizes) are only summarised.
    """
    present = {k for r in rows if r.get("status") == "done" for k, v in r.items() if v is not None}
    metrics = [m for m in METRICS if m in present]
    explanation = [m for m in explanation_metrics if m in present]
    areas = [m for m in area_metrics if m in present]
    k = folds or len({int(r["fold"]) for r in rows}) or 2
    summaries = {(a, m): summarize_arm(rows, a, m) for a in arms for m in (*metrics, *explanation, *areas)}
    tests = [
        fold_test(
            values_by_pair(rows, a, m),
            values_by_pair(rows, baseline, m),
            folds=k,
            arm=a,
            metric=m,
            alpha=alpha,
        )
        for a in arms
        if a != baseline
        for m in (*metrics, *explanation)
    ]
    adjust(tests, primary)
    return BenchmarkStats(
        arms=list(arms),
        baseline=baseline,
        primary=tuple(primary),
        folds=k,
        metrics=metrics,
        explanation_metrics=explanation,
        area_metrics=areas,
        summaries=summaries,
        tests=tests,
        n_done=sum(r["status"] == "done" for r in rows),
        n_failed=sum(r["status"] == "failed" for r in rows),
        alpha=alpha,
    )


# ----------------------------------------------------------------------------------------------------------------
# Simulations: the tests of the test (vectorised over benchmarks)


def simulate_benchmarks(
    *,
    folds: int,
    seeds: int,
    effect: float = 0.0,
    fold_sd: float = 1.0,
    seed_sd: float = 1.0,
    n_benchmarks: int = 2000,
    rng_seed: int = 0,
) -> np.ndarray:
    """Paired differences ``arm - baseline`` of simulated benchmarks, shape ``(n_benchmarks, folds, seeds)``.

    Each benchmark draws a fold-specific effect per fold (SD ``fold_sd``, shared by that fold's seeds, as a
    fold's test images, teacher and synthetic set are), seed noise per (fold, seed) (SD ``seed_sd``), and the
    arm's true effect ``effect``. One repetition of k-fold.
    """
    rng = np.random.default_rng(rng_seed)
    fold_effect = rng.normal(0.0, fold_sd, size=(n_benchmarks, folds, 1))
    return effect + fold_effect + rng.normal(0.0, seed_sd, size=(n_benchmarks, folds, seeds))


NULL_SCENARIOS = ("normal", "skewed", "correlated")
"""How fold effects are drawn under a true null in :func:`fold_test_validity`: independent normal; independent and
skewed (a centred exponential, skewness 2); normal and equicorrelated at 1/k, the correlation between folds that
share (k-2)/(k-1) of their training images which the corrected test of Nadeau & Bengio assumes."""


def null_fold_differences(
    scenario: str, folds: int, n_benchmarks: int = 4000, rng_seed: int = 0
) -> np.ndarray:
    """Per-fold differences of simulated benchmarks with no true effect, shape ``(n_benchmarks, folds)``."""
    rng = np.random.default_rng(rng_seed)
    if scenario == "normal":
        return rng.normal(size=(n_benchmarks, folds))
    if scenario == "skewed":
        return rng.exponential(size=(n_benchmarks, folds)) - 1.0
    if scenario == "correlated":
        rho = 1.0 / folds
        shared = rng.normal(size=(n_benchmarks, 1))
        return math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.normal(size=(n_benchmarks, folds))
    raise ValueError(f"unknown null scenario {scenario!r}; valid: {list(NULL_SCENARIOS)}")


def fold_test_validity(
    folds: int, alpha: float = ALPHA, n_benchmarks: int = 4000, rng_seed: int = 0
) -> dict[str, float]:
    """How often the one-repetition fold t-test rejects a true null at ``folds`` folds, per null scenario.

    A valid test rejects about ``alpha`` of the time; the report states these rates beside the primary test so a
    reader knows how far its nominal level holds at the design's k.
    """
    return {
        s: float(
            np.mean(
                corrected_t(null_fold_differences(s, folds, n_benchmarks, rng_seed), 0.0, alpha)["p"] < alpha
            )
        )
        for s in NULL_SCENARIOS
    }


def rejection_rate(diffs: np.ndarray, alpha: float = ALPHA) -> float:
    """Share of simulated benchmarks (``(n, folds, seeds)`` differences) whose fold-level t-test rejects."""
    return float(np.mean(corrected_t(diffs.mean(axis=-1), 0.0, alpha)["p"] < alpha))


def naive_wilcoxon_rejection_rate(diffs: np.ndarray, alpha: float = ALPHA) -> float:
    """Share of simulated benchmarks rejected by a Wilcoxon over every (fold, seed) pair (the old, wrong test)."""
    from scipy.stats import wilcoxon

    flat = diffs.reshape(len(diffs), -1)
    return float(np.mean(wilcoxon(flat, axis=-1, method="asymptotic").pvalue < alpha))


def simulate_repeated_cv(
    *,
    items: int = 200,
    folds: int = 5,
    repeats: int = 5,
    item_sd: float = 1.0,
    seed_sd: float = 0.1,
    n_benchmarks: int = 1000,
    alpha: float = ALPHA,
    rng_seed: int = 0,
) -> tuple[float, float]:
    """Rejection rates ``(naive, corrected)`` of repeated k-fold CV on one data set with no true effect.

    Each benchmark draws one data set of ``items`` images, each with its own paired difference (true mean 0);
    every repetition re-partitions the same images into ``folds`` test folds, so the repetitions share the data
    set's own deviation from zero. The naive t-test over the ``repeats * folds`` fold means treats them as
    independent; the corrected test (Bouckaert & Frank) accounts for the reuse.
    """
    rng = np.random.default_rng(rng_seed)
    usable = items - items % folds
    delta = rng.normal(0.0, item_sd, size=(n_benchmarks, usable))
    means = []
    for _ in range(repeats):
        order = rng.permuted(np.broadcast_to(np.arange(usable), delta.shape), axis=1)
        parts = np.take_along_axis(delta, order, axis=1).reshape(n_benchmarks, folds, -1)
        means.append(parts.mean(axis=-1) + rng.normal(0.0, seed_sd, size=(n_benchmarks, folds)))
    d = np.concatenate(means, axis=1)  # (n_benchmarks, repeats * folds)
    naive = np.mean(corrected_t(d, 0.0, alpha)["p"] < alpha)
    corrected = np.mean(corrected_t(d, 1.0 / (folds - 1), alpha)["p"] < alpha)
    return float(naive), float(corrected)
