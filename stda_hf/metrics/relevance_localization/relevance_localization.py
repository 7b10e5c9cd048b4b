"""Relevance localization: how much of an explanation's positive relevance lies in the lesion and on artifacts.

An ``evaluate`` measurement module of stda-hf, loaded by path (nothing is fetched from the Hub)::

    from stda_hf.metrics import load_metric
    m = load_metric("relevance_localization", module_type="measurement")
    m.compute(relevance=[r1, r2], lesion_mask=[m1, None], artifact_mask=[a1, None])

The per-image numbers come from :func:`stda_hf.explain.stage.localization`, the one implementation that
``stda explain`` and ``train.py`` also use.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from stda_hf.attribution.relevance import localization, summarize

_DESCRIPTION = """
Share of the positive relevance of each heatmap that falls inside the binary lesion mask
(`relevance_in_mask`), on planted artifacts (`relevance_on_artifact`, and per kind: ruler, patch, ink,
dark_corners), and the area of those regions, averaged over the images where the region is known (and, for
artifacts, present). A model that looks at the lesion has `relevance_in_mask` near 1; a model that learned a
shortcut puts its relevance on the artifact. Compare a share with its area: a uniform heatmap has a share equal
to the area fraction. Masks that are unknown (None) are reported as unavailable (None, count 0), never guessed.
"""

_KWARGS_DESCRIPTION = """
Args:
    relevance: list of 2-D arrays (H, W), relevance per pixel (summed over colour channels).
    lesion_mask: list of 2-D arrays (H, W), binary lesion masks (nonzero = lesion), or None where unknown.
    artifact_mask: list of 2-D arrays (H, W), artifact label maps (0 none, 1 ruler, 2 patch, 3 ink,
        4 dark_corners; all zero = known to have none), or None where unknown.
Returns:
    relevance_in_mask, mask_area, relevance_on_artifact, artifact_area, relevance_on_<kind>: means (None when no
    image qualifies: region unknown, absent, or no positive relevance); n_with_mask, n_with_artifact, n_with_<kind>: how many images each mean is over;
    n_images.
Examples:
    >>> m = evaluate.load("stda_hf/metrics/relevance_localization", module_type="measurement")
    >>> r = np.zeros((4, 4)); r[:2] = 1.0
    >>> mask = np.zeros((4, 4), np.uint8); mask[:2, :2] = 255
    >>> m.compute(relevance=[r], lesion_mask=[mask], artifact_mask=[None])["relevance_in_mask"]
    0.5
"""

_CITATION = """
@article{montavon2017explaining,
  title={Explaining nonlinear classification decisions with deep Taylor decomposition},
  author={Montavon, Gr{\\'e}goire and Lapuschkin, Sebastian and Binder, Alexander and Samek, Wojciech and
          M{\\"u}ller, Klaus-Robert},
  journal={Pattern Recognition}, volume={65}, pages={211--222}, year={2017}
}
"""

_GRID = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
_LABELS = datasets.Sequence(datasets.Sequence(datasets.Value("uint8")))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RelevanceLocalization(evaluate.Measurement):
    """Relevance in the lesion mask and on artifact regions, averaged over images."""

    def _info(self) -> evaluate.MeasurementInfo:
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"relevance": _GRID, "lesion_mask": _LABELS, "artifact_mask": _LABELS}
            ),
        )

    def _compute(self, relevance, lesion_mask, artifact_mask) -> dict[str, float | int | None]:
        rows = [
            localization(np.asarray(r, np.float32), _array(m), _array(a))
            for r, m, a in zip(relevance, lesion_mask, artifact_mask, strict=True)
        ]
        return summarize(rows)


def _array(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value, np.uint8)
