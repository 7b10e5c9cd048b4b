"""Where the relevance lies: the share of positive relevance inside the lesion mask and on planted artifacts.

:func:`localization` measures one image and :func:`summarize` averages many; a number is unavailable where its
region is unknown, never invented. The ``relevance_localization`` ``evaluate`` measurement, ``stda explain``
and the training hook all compute them with these same functions (numpy only).
"""

from __future__ import annotations

import numpy as np

from stda_hf.core.errors import StdaError
from stda_hf.data.real import ARTIFACTS


def region_share(pixels: np.ndarray, region: np.ndarray | None) -> float:
    """Share of the positive relevance of one image that falls inside ``region``.

    Parameters
    ----------
    pixels : np.ndarray
        Relevance per pixel ``(H, W)``.
    region : np.ndarray or None
        Boolean (or 0/1, 0/255) mask ``(H, W)``; ``None`` when unknown.

    Returns
    -------
    float
        In ``[0, 1]``; ``NaN`` when the region is unknown or empty (nothing to measure) or the image has no
        positive relevance.
    """
    if region is None:
        return float("nan")
    region = _as_mask(region, pixels.shape)
    if not region.any():
        return float("nan")
    positive = np.clip(np.asarray(pixels, np.float64), 0.0, None)
    total = positive.sum()
    return float(positive[region].sum() / total) if total > 0 else float("nan")


def _as_mask(region: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    region = np.asarray(region)
    if region.shape != tuple(shape):
        raise StdaError(f"mask of shape {region.shape} does not match the relevance map {tuple(shape)}")
    return region > 0


def localization(
    pixels: np.ndarray, lesion_mask: np.ndarray | None, artifact_map: np.ndarray | None
) -> dict[str, float]:
    """Where the relevance of one image lies: in the lesion, on artifacts (all and per kind), and region areas.

    Parameters
    ----------
    pixels : np.ndarray
        Relevance per pixel ``(H, W)``.
    lesion_mask : np.ndarray or None
        Binary lesion mask ``(H, W)``, ``None`` when unknown.
    artifact_map : np.ndarray or None
        Artifact label map ``(H, W)`` (0 none, 1 ruler, 2 patch, 3 ink, 4 dark corners, see
        :data:`stda_hf.data.real.ARTIFACTS`); ``None`` when unknown, all zero when known to have none.

    Returns
    -------
    dict
        ``relevance_in_mask``, ``mask_area`` (fraction of the image), ``relevance_on_artifact``,
        ``artifact_area`` and ``relevance_on_<kind>`` per artifact kind; a share is ``NaN`` where its region is
        unknown or absent from the image, an area is ``NaN`` where unknown. A relevance share well above its
        area means the model concentrates there.
    """
    out = {
        "relevance_in_mask": region_share(pixels, lesion_mask),
        "mask_area": _area(lesion_mask),
        "relevance_on_artifact": region_share(pixels, None if artifact_map is None else artifact_map > 0),
        "artifact_area": _area(None if artifact_map is None else artifact_map > 0),
    }
    for code, kind in enumerate(ARTIFACTS, start=1):
        region = None if artifact_map is None else artifact_map == code
        out[f"relevance_on_{kind}"] = region_share(pixels, region)
    return out


def _area(region: np.ndarray | None) -> float:
    return float("nan") if region is None else float((np.asarray(region) > 0).mean())


def summarize(rows: list[dict[str, float]]) -> dict[str, float | int | None]:
    """Average per-image :func:`localization` numbers into what the measurement and ``stda explain`` report.

    Each share is averaged over the images where it is defined (region known and present, some positive
    relevance), its area over the same images, and ``n_with_<region>`` says how many that is; a mean over no
    image is ``None`` (unavailable), never a guess.
    """
    out: dict[str, float | int | None] = {"n_images": len(rows)}
    pairs = [
        ("relevance_in_mask", "mask_area", "mask"),
        ("relevance_on_artifact", "artifact_area", "artifact"),
    ]
    pairs += [(f"relevance_on_{kind}", None, kind) for kind in ARTIFACTS]
    for share, area, name in pairs:
        keep = [r for r in rows if is_defined(r.get(share))]
        out[share] = mean_or_none([r[share] for r in keep])
        if area is not None:
            out[area] = mean_or_none([r[area] for r in keep])
        out[f"n_with_{name}"] = len(keep)
    return out


def is_defined(value: float | None) -> bool:
    """Whether a number was measured (neither None nor NaN)."""
    return value is not None and not np.isnan(value)


def mean_or_none(values: list[float]) -> float | None:
    """The mean of ``values``; None (unavailable) for none."""
    return float(np.mean(values)) if values else None
