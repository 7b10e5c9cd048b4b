"""Binary classification metrics for benign (0) vs malignant (1): an ``evaluate`` module loaded by path.

Load it with ``evaluate.load(stda_hf.metrics.metric_path("binary_classification"))`` (or
:func:`stda_hf.metrics.load_metric`); nothing is fetched from the Hub. The module is self-contained (numpy and
scipy only) because ``evaluate`` copies it into its own cache before importing it.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from scipy.stats import rankdata

_DESCRIPTION = """
Metrics of a binary classifier whose positive class is 1 (malignant): accuracy, balanced accuracy (mean recall
over the classes present in the references), sensitivity (recall of class 1), specificity (recall of class 0),
precision and F1 of class 1, ROC AUC from the scores, and the confusion matrix [[tn, fp], [fn, tp]] (rows: true
class, columns: predicted class).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids (0 or 1).
    references (`list` of `int`): true class ids (0 or 1).
    prediction_scores (`list` of `float`): score of class 1 for each example (e.g. its softmax probability);
        ROC AUC ranks the examples by it.
    zero_division (`float`, defaults to 0.0): value of a ratio whose denominator is zero (e.g. precision when
        nothing is predicted positive), as in scikit-learn.
Returns:
    accuracy, balanced_accuracy, sensitivity, specificity, precision, f1, roc_auc (floats; roc_auc is NaN when
    the references hold a single class), confusion_matrix ([[tn, fp], [fn, tp]]), tn, fp, fn, tp, n.
Examples:
    >>> metric = evaluate.load("stda_hf/metrics/binary_classification")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], prediction_scores=[0.1, 0.9, 0.6])["roc_auc"]
    1.0
"""

_CITATION = """
@article{hanley1982auc,
  title={The meaning and use of the area under a receiver operating characteristic (ROC) curve},
  author={Hanley, James A and McNeil, Barbara J},
  journal={Radiology}, volume={143}, number={1}, pages={29--36}, year={1982}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BinaryClassification(evaluate.Metric):
    """Accuracy, balanced accuracy, sensitivity, specificity, precision, F1, ROC AUC and confusion matrix."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                    "prediction_scores": datasets.Value("float64"),
                }
            ),
            reference_urls=["https://en.wikipedia.org/wiki/Sensitivity_and_specificity"],
        )

    def _compute(self, predictions, references, prediction_scores, zero_division: float = 0.0) -> dict:
        pred = np.asarray(predictions, dtype=np.int64)
        ref = np.asarray(references, dtype=np.int64)
        scores = np.asarray(prediction_scores, dtype=np.float64)
        bad = sorted(set(np.unique(np.concatenate([pred, ref])).tolist()) - {0, 1})
        if bad:
            raise ValueError(f"class ids must be 0 (benign) or 1 (malignant); got {bad}")
        return binary_metrics(pred, ref, scores, zero_division)


def binary_metrics(pred: np.ndarray, ref: np.ndarray, scores: np.ndarray, zero_division: float = 0.0) -> dict:
    """All metrics of the module from arrays of predicted ids, true ids and class-1 scores."""
    tp = int(np.sum((pred == 1) & (ref == 1)))
    tn = int(np.sum((pred == 0) & (ref == 0)))
    fp = int(np.sum((pred == 1) & (ref == 0)))
    fn = int(np.sum((pred == 0) & (ref == 1)))
    sensitivity = _ratio(tp, tp + fn, zero_division)
    specificity = _ratio(tn, tn + fp, zero_division)
    precision = _ratio(tp, tp + fp, zero_division)
    present = [r for r, n in ((sensitivity, tp + fn), (specificity, tn + fp)) if n > 0]
    return {
        "accuracy": _ratio(tp + tn, len(ref), zero_division),
        "balanced_accuracy": float(np.mean(present)) if present else zero_division,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, zero_division),
        "roc_auc": roc_auc(ref, scores),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "n": len(ref),
    }


def _ratio(num: float, den: float, zero_division: float) -> float:
    return float(num) / float(den) if den else float(zero_division)


def roc_auc(ref: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half); NaN for one class."""
    n_pos = int(np.sum(ref == 1))
    n_neg = len(ref) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if not np.all(np.isfinite(scores)):
        raise ValueError("prediction_scores hold NaN or infinite values")
    ranks = rankdata(scores)  # average ranks, so tied scores count one half
    u = float(np.sum(ranks[ref == 1])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)
