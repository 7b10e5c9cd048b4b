"""The benchmark's statistics with the fold as the unit: known values, and simulations that test the tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stda_hf.benchmark import stats

# ----------------------------------------------------------------------------------------------------------------
# Known values


def test_fold_differences_average_the_seeds_of_each_fold_first():
    arm = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 5.0, (2, 0): 9.0}
    base = {(0, 0): 0.0, (0, 1): 0.0, (1, 0): 1.0}
    diffs, pairs = stats.fold_differences(arm, base)
    assert diffs == {(0, 0): 2.0, (0, 1): 4.0} and pairs == 3


def test_t_test_over_fold_means_matches_the_textbook_one_sample_t():
    from scipy.stats import ttest_1samp

    d = np.array([0.02, 0.05, -0.01, 0.04, 0.03])
    out = stats.corrected_t(d)
    reference = ttest_1samp(d, 0.0)
    assert float(out["t"]) == pytest.approx(reference.statistic)
    assert float(out["p"]) == pytest.approx(reference.pvalue)
    assert out["dof"] == 4


def test_corrected_t_inflates_the_variance_by_the_nadeau_bengio_term():
    d = np.array([0.02, 0.05, -0.01, 0.04, 0.03, 0.01, 0.0, 0.06, 0.02, 0.03])
    plain, corrected = stats.corrected_t(d, 0.0), stats.corrected_t(d, 0.25)
    assert float(corrected["se"]) == pytest.approx(float(plain["se"]) * math.sqrt((0.1 + 0.25) / 0.1))
    assert float(corrected["p"]) > float(plain["p"])


def test_sign_flip_p_of_all_positive_folds_is_its_floor_and_of_balanced_folds_is_one():
    assert float(stats.sign_flip_p(np.array([0.1, 0.2, 0.3, 0.4, 0.5]))) == pytest.approx(2 / 2**5)
    assert float(stats.sign_flip_p(np.array([0.1, -0.1, 0.2, -0.2]))) == pytest.approx(1.0)


def test_exact_wilcoxon_drops_a_zero_and_gives_the_exact_p():
    statistic, p, n = stats.exact_wilcoxon(np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.0]))
    assert (statistic, n) == (0.0, 5)
    assert p == pytest.approx(0.0625)  # 2 / 2**5, not the normal approximation's 0.043


def test_exact_wilcoxon_of_only_zeros_is_not_computed():
    assert stats.exact_wilcoxon(np.zeros(4))[2] == 0 and math.isnan(stats.exact_wilcoxon(np.zeros(4))[1])


def test_fold_test_of_identical_fold_gains_rejects_and_says_what_few_folds_cannot_do():
    arm = {(f, s): 0.8 for f in range(3) for s in range(2)}
    base = {(f, s): 0.7 for f in range(3) for s in range(2)}
    test = stats.fold_test(arm, base, folds=3)
    assert test.p_value == 0.0 and test.mean_diff == pytest.approx(0.1)
    assert test.ci_low == pytest.approx(0.1) and test.ci_high == pytest.approx(0.1)
    assert "cannot go below p = 0.25" in test.notes[0]


def test_detectable_difference_is_the_80_percent_power_distance_from_the_stated_sd():
    from scipy.stats import t

    expected = (t.ppf(0.975, 4) + t.ppf(0.8, 4)) * 0.02 / math.sqrt(5)
    assert stats.detectable_difference(0.02, 5) == pytest.approx(expected)
    assert stats.detectable_difference(0.02, 20, 0.25) == pytest.approx(
        (t.ppf(0.975, 19) + t.ppf(0.8, 19)) * 0.02 * math.sqrt(1 / 20 + 0.25)
    )


def test_no_detectable_difference_without_a_stated_sd_or_with_one_fold():
    assert math.isnan(stats.detectable_difference(0.0, 5)) and math.isnan(
        stats.detectable_difference(0.02, 1)
    )


def test_detectable_difference_finds_the_effect_80_percent_of_the_time():
    """Simulated: a true effect of exactly the detectable size is found in about 80% of null-free benchmarks."""
    k, sd = 10, 0.03
    effect = stats.detectable_difference(sd, k)
    d = effect + np.random.default_rng(0).normal(0.0, sd, size=(4000, k))
    power = np.mean(stats.corrected_t(d)["p"] < 0.05)
    assert 0.77 < power < 0.83


def test_the_fold_t_test_keeps_its_level_under_a_normal_null_and_says_where_it_does_not():
    rates = stats.fold_test_validity(5)
    assert set(rates) == set(stats.NULL_SCENARIOS)
    assert 0.04 < rates["normal"] < 0.06  # a valid test at its nominal level
    assert rates["correlated"] > 0.09  # folds sharing training images: the one-repetition test is liberal
    assert rates["skewed"] > rates["normal"]


def test_null_fold_differences_have_the_scenario_s_shape():
    skewed = stats.null_fold_differences("skewed", 5, 20000)
    assert abs(skewed.mean()) < 0.02 and ((skewed - skewed.mean()) ** 3).mean() > 1.5  # mean 0, skewness 2
    corr = np.corrcoef(stats.null_fold_differences("correlated", 5, 20000).T)
    assert corr[0, 1] == pytest.approx(0.2, abs=0.03)  # 1/k
    with pytest.raises(ValueError, match="unknown null scenario"):
        stats.null_fold_differences("uniform", 5)


def test_holm_leaves_the_primary_alone():
    tests = [
        stats.FoldTest("mix", m, "", 1, 5, 5, 0, 0, 0, 0, 4, p, 0, 0, 0, 0)
        for m, p in (("roc_auc", 0.04), ("f1", 0.01), ("sensitivity", 0.03))
    ]
    stats.adjust(tests, ("mix", "roc_auc"))
    assert tests[0].primary and tests[0].p_adjusted == 0.04
    assert [t.p_adjusted for t in tests[1:]] == pytest.approx([0.02, 0.03])


# ----------------------------------------------------------------------------------------------------------------
# Simulations: the level, the old test's failure, power with folds, repeated CV


def test_null_simulation_rejects_at_the_nominal_five_percent():
    diffs = stats.simulate_benchmarks(folds=5, seeds=5, fold_sd=1.0, seed_sd=1.0, n_benchmarks=2000)
    assert 0.025 <= stats.rejection_rate(diffs) <= 0.075


def test_the_wilcoxon_over_fold_seed_pairs_rejects_a_true_null_far_too_often():
    diffs = stats.simulate_benchmarks(folds=5, seeds=5, fold_sd=1.0, seed_sd=1.0, n_benchmarks=2000)
    assert stats.naive_wilcoxon_rejection_rate(diffs) > 0.15


def test_with_a_planted_effect_rejection_grows_with_the_number_of_folds():
    rates = [
        stats.rejection_rate(
            stats.simulate_benchmarks(folds=k, seeds=5, effect=1.0, n_benchmarks=2000, rng_seed=k)
        )
        for k in (3, 5, 10)
    ]
    assert rates[0] < rates[1] < rates[2]
    assert rates[0] > 0.075  # above the level even with three folds


def test_repeated_cv_naive_test_overrejects_and_the_correction_restores_the_level():
    naive, corrected = stats.simulate_repeated_cv(items=200, folds=5, repeats=5, n_benchmarks=1000)
    assert naive > 0.15
    assert corrected <= 0.06
