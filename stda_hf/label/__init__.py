"""``stda label``: pseudo-labels for synthetic images from a teacher trained on real training images only."""

from stda_hf.label.stage import (
    LABELS_FILE,
    SUMMARY_FILE,
    LabelConfig,
    LabelSummary,
    label_record,
    label_synthetic,
    passed_gate,
    summarize,
)

__all__ = [
    "LABELS_FILE",
    "SUMMARY_FILE",
    "LabelConfig",
    "LabelSummary",
    "label_record",
    "label_synthetic",
    "passed_gate",
    "summarize",
]
