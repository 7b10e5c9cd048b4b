"""Was an artifact of the style image copied into a synthetic image? One verdict per artifact kind.

Style transfer moves texture statistics, not locations: a ruler, colour patch, ink mark or dermoscope vignette of
the style image can turn up anywhere in the synthetic image, so the test looks for the artifact's look, not its
place. For one ``(content, style, synthetic)`` triple and the artifact label maps of the style (and, when known,
of the content), per artifact kind that the style shows and the content does not:

1. **Signature.** Every pixel is described twice: by its CIELAB colour, and by a colour-and-structure feature,
   its colour with the colours of the darkest and the lightest pixel of its 3 x 3 neighbourhood. A purple ink
   stroke, a saturated patch cell and a near-black corner differ from skin and lesion by colour; a thin dark ruler
   tick on a cream band by its neighbourhood. In each description, the kind's signature is the set of the style's
   pixels of that kind whose description lies farther than ``distinct`` from every pixel of the rest of the style
   image (its skin, lesion, hairs and other artifacts) and from every pixel of the content image.
2. **Evidence.** A synthetic pixel is evidence of a copy when, in either description, it lies within ``distinct``
   of the signature and farther than ``distinct`` from every pixel of the content image and of the rest of the
   style image: it looks like the style's artifact and like nothing the synthetic image could have taken from the
   content or from the style's skin and lesion. Pixels on the content's own artifacts (grown by one pixel) are no
   evidence: both engines keep the content's layout, and a content's colour patch restyled can look like a ruler.
   Specks are dropped: evidence counts only in 8-connected blobs of
   at least ``min_blob`` of the frame (3 pixels at least), since an artifact is an object, and JPEG ringing beside
   a hair leaves isolated overshoot pixels of patch-like colour.
3. **Verdict.** The kind counts as copied when the evidence covers at least ``min_fraction`` of the synthetic
   image (and at least ``min_pixels`` pixels). The kind is *measurable* when the style image itself, taken as the
   synthetic image, would be judged a copy; otherwise no copy of it could be seen (a cream ruler on very light skin
   whose ticks look like the style's hairs) and its verdict is reported apart (``measurable`` False, ``copied``
   False), never counted as "not copied".

Distances are Delta E 1976 (CIELAB) for the colour, root-mean-square Delta E over the three colours for the
structure feature. ``distinct`` = 12 is about five just-noticeable differences (Delta E ~2.3): above what a colour
jitter of 6 % per channel, a JPEG re-encoding at quality 30 or a 1-pixel Gaussian blur does to skin and lesion
(``benchmarks/artifact_copy.py --validate``: no false positive in 736 such cases at 64 px), below the gap between
each artifact colour and skin. ``min_fraction`` = 0.25 % of the frame (11 pixels at 64 px) is a quarter of the
smallest artifact the phantoms draw (an ink stroke, about 1 % of the frame). The price is sensitivity to thin ink
strokes: re-encoded as JPEG on another background their chroma smears into it, and about a third of pasted ones
fall below the threshold (the validation prints the rate per kind).

Hairs are not in the phantoms' artifact maps, so they are part of "the rest of the style image", never a kind: a
copied hair is not measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation, label, maximum_filter, minimum_filter
from scipy.spatial import cKDTree

from stda_hf.core.errors import StdaError
from stda_hf.data.real import ARTIFACTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyThresholds:
    """The measure's two thresholds (see the module docstring for why these values)."""

    distinct: float = 12.0  # RMS Delta E between features: farther is "different", nearer is "the same"
    min_fraction: float = 0.0025  # evidence must cover this share of the synthetic image ...
    min_pixels: int = 4  # ... and at least this many pixels
    min_blob: float = (
        0.001  # evidence counts in 8-connected blobs of at least this share of the image (>= 3 px)
    )

    def __post_init__(self) -> None:
        if not self.distinct > 0:
            raise StdaError(f"distinct {self.distinct}: must be a positive Delta E")
        if not 0.0 <= self.min_fraction < 1.0:
            raise StdaError(f"min_fraction {self.min_fraction}: must be in [0, 1)")
        if not 0.0 <= self.min_blob < 1.0:
            raise StdaError(f"min_blob {self.min_blob}: must be in [0, 1)")
        if self.min_pixels < 1:
            raise StdaError(f"min_pixels {self.min_pixels}: must be at least 1")


@dataclass(frozen=True)
class KindVerdict:
    """The verdict for one artifact kind of the style image."""

    kind: str
    measurable: bool  # the style image itself, as the synthetic image, would be judged a copy
    copied: bool  # measurable and the evidence reaches the thresholds
    pixels: int  # evidence pixels in the synthetic image
    fraction: float  # evidence pixels / synthetic pixels (the score)
    signature: int  # evidence pixels in the style image itself: the most a copy can show


# ----------------------------------------------------------------------------------------------------------------
# Pixel features.


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB values ``(..., 3)``, as float32 ``(..., 3)``."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)
    return lab.astype(np.float32)


def pixel_features(rgb: np.ndarray) -> np.ndarray:
    """Colour-and-structure feature of every pixel of an ``(H, W, 3)`` uint8 image: ``(H, W, 9)`` float32.

    The pixel's CIELAB colour, then the CIELAB colour of the darkest and of the lightest pixel (by L*) of its
    3 x 3 neighbourhood, each divided by sqrt(3) so that Euclidean distance is the RMS Delta E of the three.
    """
    lab = srgb_to_lab(rgb)
    h, w = lab.shape[:2]
    lightness = lab[..., 0]
    flat = np.arange(h * w).reshape(h, w)
    # Rank by lightness, breaking ties by position, so min/max filters pick one neighbour's whole colour.
    order = np.empty(h * w, np.int64)
    order[np.lexsort((flat.ravel(), lightness.ravel()))] = np.arange(h * w)
    rank = order.reshape(h, w)
    by_rank = np.argsort(order)
    darkest = by_rank[minimum_filter(rank, size=3, mode="nearest")]
    lightest = by_rank[maximum_filter(rank, size=3, mode="nearest")]
    flat_lab = lab.reshape(-1, 3)
    feats = np.concatenate([lab, flat_lab[darkest], flat_lab[lightest]], axis=-1)
    return (feats / np.sqrt(3.0)).astype(np.float32)


def _as_rgb(image: np.ndarray | Image.Image, what: str) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise StdaError(f"{what}: expected an 8-bit RGB image (H, W, 3) uint8, got {arr.dtype} {arr.shape}")
    return arr


def _as_labels(labels: np.ndarray | Image.Image | None, shape: tuple[int, int], what: str) -> np.ndarray:
    if labels is None:
        return np.zeros(shape, np.uint8)
    arr = np.asarray(labels)
    if arr.shape != shape:
        raise StdaError(
            f"{what}: artifact label map is {arr.shape}, its image is {shape}; give the map of that image"
        )
    if arr.size and int(arr.max()) > len(ARTIFACTS):
        raise StdaError(
            f"{what}: artifact label map holds code {int(arr.max())}; codes are 0 (none) to {len(ARTIFACTS)} "
            f"({', '.join(f'{i + 1}={a}' for i, a in enumerate(ARTIFACTS))})"
        )
    return arr


def artifact_kinds(labels: np.ndarray | Image.Image | None) -> tuple[str, ...]:
    """The artifact kinds an artifact label map shows, in :data:`ARTIFACTS` order."""
    if labels is None:
        return ()
    codes = set(np.unique(np.asarray(labels)).tolist())
    return tuple(a for i, a in enumerate(ARTIFACTS) if i + 1 in codes)


def read_labels(path: str | Path | None, shape: tuple[int, int]) -> np.ndarray:
    """An ``artifacts/<id>.png`` label map resized (nearest) to ``shape``; all zeros for ``None`` (no artifact)."""
    if path is None:
        return np.zeros(shape, np.uint8)
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            if img.size != (shape[1], shape[0]):
                img = img.resize((shape[1], shape[0]), Image.NEAREST)
            return np.asarray(img, np.uint8)
    except OSError as err:
        raise StdaError(
            f"{path}: cannot read this artifact label map ({err}); re-render the phantom folder"
        ) from err


# ----------------------------------------------------------------------------------------------------------------
# Verdicts.


def _nearest(points: np.ndarray, queries: np.ndarray) -> np.ndarray:
    if len(points) == 0:
        return np.full(len(queries), np.inf, np.float32)
    return cKDTree(points).query(queries, k=1)[0].astype(np.float32)


def _colour_features(rgb: np.ndarray) -> np.ndarray:
    return srgb_to_lab(rgb)


def _own_artifacts(c_labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Where the content's own artifacts lie in the synthetic image (grown by one pixel): both engines keep the
    content's layout, so what the synthetic image shows there was made from the content's artifact."""
    own = c_labels > 0
    if not own.any():
        return np.zeros(shape, bool)
    if own.shape != shape:
        own = (
            np.asarray(Image.fromarray(own.astype(np.uint8)).resize((shape[1], shape[0]), Image.NEAREST)) > 0
        )
    return binary_dilation(own, structure=np.ones((3, 3), bool))


def _drop_specks(hit: np.ndarray, smallest: int) -> np.ndarray:
    """``hit`` without its 8-connected blobs of fewer than ``smallest`` pixels."""
    blobs, n = label(hit, structure=np.ones((3, 3), bool))
    if n == 0:
        return hit
    sizes = np.bincount(blobs.ravel())
    keep = sizes >= smallest
    keep[0] = False
    return keep[blobs]


def _channel_hits(
    f_content: np.ndarray, f_style: np.ndarray, f_syn: np.ndarray, is_kind: np.ndarray, distinct: float
) -> np.ndarray:
    """The pixels of ``f_syn`` that match the kind's signature in one feature channel and nothing else."""
    explained = cKDTree(np.concatenate([f_style[~is_kind], f_content]))
    art = f_style[is_kind]
    signature = art[explained.query(art, k=1)[0] > distinct]
    hit = np.zeros(len(f_syn), bool)
    if len(signature):
        near = _nearest(signature, f_syn) <= distinct
        if near.any():
            hit[near] = explained.query(f_syn[near], k=1)[0] > distinct
    return hit


def copy_evidence(
    content: np.ndarray | Image.Image,
    style: np.ndarray | Image.Image,
    synthetic: np.ndarray | Image.Image,
    style_labels: np.ndarray | Image.Image | None,
    content_labels: np.ndarray | Image.Image | None = None,
    thresholds: CopyThresholds | None = None,
) -> tuple[dict[str, KindVerdict], dict[str, np.ndarray]]:
    """Per artifact kind of the style that the content lacks: the verdict and the evidence map.

    Parameters
    ----------
    content, style, synthetic : (H, W, 3) uint8 arrays or PIL images
        The content and style images the synthetic image was made from (any sizes), and the synthetic image.
    style_labels, content_labels : (H, W) uint8 arrays, PIL images or None
        Artifact label maps of the style and content (codes: position in :data:`ARTIFACTS` plus one; None: no
        artifact). A kind the content shows itself is not judged: the synthetic image may take it from there.
    thresholds : CopyThresholds, optional
        The measure's thresholds.

    Returns
    -------
    verdicts : dict
        ``{kind: KindVerdict}`` for each judged kind, in :data:`ARTIFACTS` order.
    evidence : dict
        ``{kind: (H, W) bool}``: the synthetic pixels that count as evidence of a copy.

    Raises
    ------
    StdaError
        An image that is not 8-bit RGB, or a label map whose shape or codes do not fit its image.
    """
    t = thresholds or CopyThresholds()
    content, style, synthetic = (
        _as_rgb(content, "content image"),
        _as_rgb(style, "style image"),
        _as_rgb(synthetic, "synthetic image"),
    )
    s_labels = _as_labels(style_labels, style.shape[:2], "style image").ravel()
    c_labels = _as_labels(content_labels, content.shape[:2], "content image")
    kinds = [k for k in artifact_kinds(s_labels) if k not in artifact_kinds(c_labels)]
    verdicts: dict[str, KindVerdict] = {}
    evidence: dict[str, np.ndarray] = {}
    if not kinds:
        return verdicts, evidence
    channels = [
        (f(content).reshape(len(c_labels.ravel()), -1), f(style).reshape(len(s_labels), -1), f(synthetic))
        for f in (_colour_features, pixel_features)
    ]
    own_artifacts = _own_artifacts(c_labels, synthetic.shape[:2])
    area = synthetic.shape[0] * synthetic.shape[1]
    need = max(t.min_pixels, int(np.ceil(t.min_fraction * area)))
    blob = max(3, int(np.ceil(t.min_blob * area)))
    for kind in kinds:
        is_kind = s_labels == ARTIFACTS.index(kind) + 1
        hit = np.zeros(area, bool)
        own = np.zeros(len(s_labels), bool)  # the style image judged against itself
        for f_content, f_style, f_syn in channels:
            hit |= _channel_hits(f_content, f_style, f_syn.reshape(area, -1), is_kind, t.distinct)
            own |= _channel_hits(f_content, f_style, f_style, is_kind, t.distinct)
        hit = _drop_specks(hit.reshape(synthetic.shape[:2]) & ~own_artifacts, blob).ravel()
        signature = int(_drop_specks(own.reshape(style.shape[:2]), blob).sum())
        measurable = signature >= max(t.min_pixels, int(np.ceil(t.min_fraction * own.size)))
        pixels = int(hit.sum())
        verdicts[kind] = KindVerdict(
            kind=kind,
            measurable=measurable,
            copied=measurable and pixels >= need,
            pixels=pixels,
            fraction=pixels / area,
            signature=signature,
        )
        evidence[kind] = hit.reshape(synthetic.shape[:2])
    return verdicts, evidence


def copy_verdicts(
    content: np.ndarray | Image.Image,
    style: np.ndarray | Image.Image,
    synthetic: np.ndarray | Image.Image,
    style_labels: np.ndarray | Image.Image | None,
    content_labels: np.ndarray | Image.Image | None = None,
    thresholds: CopyThresholds | None = None,
) -> dict[str, KindVerdict]:
    """Per artifact kind of the style that the content lacks, whether it was copied (:func:`copy_evidence`)."""
    return copy_evidence(content, style, synthetic, style_labels, content_labels, thresholds)[0]


def any_copied(verdicts: dict[str, KindVerdict]) -> bool:
    """Whether any judged kind was copied."""
    return any(v.copied for v in verdicts.values())


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95 % by default); ``(0, 1)`` when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))
