"""The binary_classification evaluate module: loaded by path offline, exact numbers on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stda_hf.core.errors import StdaError
from stda_hf.metrics import load_metric, metric_path
from stda_hf.training.model_card import roc_points


@pytest.fixture(scope="module")
def metric():
    return load_metric("binary_classification")


def test_module_loads_by_path_without_the_hub(metric, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any Hub access would fail
    import evaluate

    loaded = evaluate.load(metric_path("binary_classification"), keep_in_memory=True)
    assert loaded.name == "binary_classification"
    assert loaded.compute(predictions=[1], references=[1], prediction_scores=[0.9])["accuracy"] == 1.0


def test_counts_and_ratios_match_a_hand_computed_example(metric):
    # refs:  1 1 1 0 0 0 0 0 ; preds: 1 1 0 1 0 0 0 0  -> tp 2, fn 1, fp 1, tn 4
    refs = [1, 1, 1, 0, 0, 0, 0, 0]
    preds = [1, 1, 0, 1, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05]
    r = metric.compute(predictions=preds, references=refs, prediction_scores=scores)
    assert r["confusion_matrix"] == [[4, 1], [1, 2]]
    assert (r["tn"], r["fp"], r["fn"], r["tp"], r["n"]) == (4, 1, 1, 2, 8)
    assert r["accuracy"] == pytest.approx(6 / 8)
    assert r["sensitivity"] == pytest.approx(2 / 3)
    assert r["specificity"] == pytest.approx(4 / 5)
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # positives 0.9, 0.8, 0.3 vs negatives 0.7, 0.2, 0.1, 0.4, 0.05: 0.3 beats 3 of 5 -> (5 + 5 + 3) / 15
    assert r["roc_auc"] == pytest.approx(13 / 15)


def test_roc_auc_counts_tied_scores_as_one_half(metric):
    r = metric.compute(predictions=[1, 1, 1, 1], references=[1, 0, 1, 0], prediction_scores=[0.5] * 4)
    assert r["roc_auc"] == pytest.approx(0.5)


def test_roc_auc_is_nan_when_the_references_hold_one_class(metric):
    r = metric.compute(predictions=[0, 1], references=[0, 0], prediction_scores=[0.2, 0.9])
    assert math.isnan(r["roc_auc"])
    assert r["balanced_accuracy"] == pytest.approx(0.5)  # recall of the one class present


def test_zero_denominators_take_the_zero_division_value(metric):
    r = metric.compute(predictions=[0, 0], references=[1, 0], prediction_scores=[0.1, 0.2], zero_division=0.0)
    assert r["precision"] == 0.0 and r["f1"] == 0.0
    r = metric.compute(predictions=[0, 0], references=[1, 0], prediction_scores=[0.1, 0.2], zero_division=1.0)
    assert r["precision"] == 1.0


def test_class_ids_other_than_0_and_1_are_refused(metric):
    with pytest.raises(ValueError, match="0 \\(benign\\) or 1 \\(malignant\\)"):
        metric.compute(predictions=[0, 2], references=[0, 1], prediction_scores=[0.1, 0.9])


def test_unknown_module_name_lists_the_shipped_ones():
    with pytest.raises(StdaError, match="binary_classification"):
        metric_path("accuracy")


def test_plotted_roc_curve_has_the_area_the_metric_reports(metric):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(labels * 0.3 + rng.random(200), 1)  # rounded: many ties
    fpr, tpr = roc_points(labels, scores)
    area = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))
    auc = metric.compute(
        predictions=(scores > 0.5).astype(int).tolist(),
        references=labels.tolist(),
        prediction_scores=scores.tolist(),
    )["roc_auc"]
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert area == pytest.approx(auc)
