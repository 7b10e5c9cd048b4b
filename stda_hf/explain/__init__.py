"""``stda explain``: explain a trained model on a folder or dataset split; heatmaps, overlays and shares out."""

from stda_hf.attribution.engine import COMPOSITE_NAMES
from stda_hf.explain.stage import ExplainConfig, run_explain

__all__ = ["COMPOSITE_NAMES", "ExplainConfig", "run_explain"]
