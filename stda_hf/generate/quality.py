"""The quality gate of a synthetic image: did style transfer restyle it, and did it keep the lesion?

Pure functions on tensors, usable for any engine (Gatys optimisation or a feed-forward network)::

    scorer = StyleDistance()                                      # a fixed, seeded VGG16: same numbers everywhere
    record = assess(content, style, result, scorer, mask=mask)    # one QualityRecord per image
    record.verdict, record.to_dict()                              # "ok", "unchanged" or "content_lost"

Measures, per image (content, style and result are RGB (3, H, W) in [0, 1] of the same size, the style image
may differ in size):

- **style distance** before (content vs style) and after (result vs style): :class:`StyleDistance`, the mean
  over five layers of a fixed, seeded random VGG16 (``conv1_1 .. conv5_1``) of the relative Frobenius distance of
  normalised Gram matrices ``|G(x) - G(style)| / |G(style)|``. The network is the same for every engine and every
  run (seed 0, built on the CPU), so distances are comparable across runs and engines; random features measure
  colour and texture statistics, not ImageNet semantics. ``style_reduction = 1 - after / before``.
- **structure** against the content image: SSIM of luminance (Wang et al. 2004: 11x11 Gaussian window, sigma
  1.5, C1 = 0.01^2, C2 = 0.03^2 on luminance in [0, 1]); with a lesion mask, also the IoU of the lesion outline:
  the result's lesion is estimated as the darker class of an Otsu threshold of its luminance (lesions are darker
  than the skin around them), and compared with the mask. The same estimate on the content image itself does
  not always find the lesion (dark corners, hair, a faint lesion), so the score is relative: ``lesion_kept`` is
  ``IoU(result) / IoU(content)`` (at most 1), used only where the content's own IoU is at least
  ``MIN_CONTENT_IOU``. ``structure`` is the SSIM, or the lower of SSIM and ``lesion_kept`` when that is used.
- **mean absolute pixel change** ``mean |result - content|`` in 0-255 units.

The verdict (:func:`verdict`): ``content_lost`` when ``structure`` is below ``QualityGate.min_structure``,
else ``unchanged`` when ``style_reduction`` is below ``QualityGate.min_style_reduction``, else ``ok``. The
defaults are justified in :class:`QualityGate`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from stda_hf.core.errors import StdaError

logger = logging.getLogger(__name__)

VERDICTS = ("ok", "unchanged", "content_lost")
STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
MIN_CONTENT_IOU = 0.5
"""The outline estimate must find the lesion on the content image this well before it scores a result."""


@dataclass(frozen=True)
class QualityGate:
    """Thresholds of the verdict.

    Defaults, measured with ``benchmarks/nst_figure.py --thresholds`` on 8 phantom pairs at 64 px with random VGG
    weights (small sample, random features: a starting point, not a calibration). A no-op (0 evaluations):
    style reduction 0.00, structure 1.00. The default preset, 50 evaluations: style reduction 0.33 to 0.88,
    structure 0.31 to 0.94, all 8 ``ok`` (with its former content layer conv4_2: 0.46 to 0.91 and 0.18 to 0.92,
    the one at 0.18 had lost the lesion outline). A wipe (content weight 0, noise start): style reduction 0.78 to
    0.97, structure 0.01 to 0.17 on 6 of 8 (0.30 and 0.50 on two whose outline the estimate could not score,
    SSIM only). So 0.1 of style reduction separates a no-op from any run that did something, and 0.25 of
    structure catches the wipes without failing the default preset's runs, which keep the lesion.
    """

    min_style_reduction: float = 0.1  # unchanged below this fall of the style distance (1 - after / before)
    min_structure: float = 0.25  # content_lost below this structure score (SSIM, or min(SSIM, mask IoU))

    def __post_init__(self) -> None:
        if not self.min_style_reduction < 1 or not 0 <= self.min_structure <= 1:
            raise StdaError(
                f"quality gate: min_style_reduction {self.min_style_reduction} must be < 1 and min_structure "
                f"{self.min_structure} within [0, 1]"
            )


@dataclass
class QualityRecord:
    """What the gate measured for one synthetic image, and its verdict (``to_dict`` for a manifest line)."""

    style_before: float  # style distance of the content image to the style image
    style_after: float  # style distance of the result to the style image
    style_reduction: float  # 1 - after / before
    ssim: float  # SSIM of luminance, result vs content
    mask_iou: float | None  # IoU of the result's Otsu lesion outline with the lesion mask (None: no mask)
    content_mask_iou: float | None  # the same for the content image (how well the estimate works at all)
    lesion_kept: float | None  # mask_iou / content_mask_iou, at most 1 (None: no mask, or estimate unusable)
    structure: float  # ssim, or min(ssim, lesion_kept)
    mean_abs_change: float  # mean |result - content| in 0-255 units
    verdict: str  # ok, unchanged or content_lost
    terms: dict[str, float] = field(default_factory=dict)  # engine's initial_/final_ loss terms, if any

    def to_dict(self) -> dict:
        """A JSON-ready dict (floats rounded to 6 significant digits)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = float(f"{value:.6g}")
        out["terms"] = {k: float(f"{v:.6g}") for k, v in self.terms.items()}
        return out


# ----------------------------------------------------------------------------------------------------------------
# Structure


def luminance(images: Tensor) -> Tensor:
    """Luma (ITU-R BT.601) of RGB images (B, 3, H, W) in [0, 1]: (B, 1, H, W)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM per image of single-channel images (B, 1, H, W) in [0, 1] (Wang et al. 2004): (B,).

    The window shrinks to the image for images smaller than ``window``; borders are not padded (valid windows).
    """
    size = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(size, sigma, a.dtype, a.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


def otsu_threshold(values: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold of each image's values (B, ...) in [0, 1]: the cut maximising between-class variance (B,)."""
    flat = values.flatten(1).clamp(0, 1)
    idx = (flat * (bins - 1)).round().long()
    hist = torch.zeros(len(flat), bins, dtype=torch.float64, device=flat.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    p = hist / hist.sum(1, keepdim=True)
    levels = torch.arange(bins, dtype=torch.float64, device=flat.device) / (bins - 1)
    w0 = p.cumsum(1)
    mu = (p * levels).cumsum(1)
    mu_total = mu[:, -1:]
    between = (mu_total * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    return levels[between.argmax(1)].to(values.dtype)


def lesion_outline(images: Tensor) -> Tensor:
    """Estimated lesion of RGB images (B, 3, H, W): luminance at or below its Otsu threshold, (B, H, W) bool."""
    lum = luminance(images)[:, 0]
    return lum <= otsu_threshold(lum).view(-1, 1, 1)


def mask_iou(pred: Tensor, mask: Tensor) -> Tensor:
    """Intersection over union per image of boolean masks (B, H, W); 1 where both are empty: (B,)."""
    inter = (pred & mask).flatten(1).sum(1).double()
    union = (pred | mask).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mean_abs_change(result: Tensor, content: Tensor) -> Tensor:
    """Mean absolute pixel change per image in 0-255 units, images (B, 3, H, W) in [0, 1]: (B,)."""
    return (result.double() - content.double()).abs().flatten(1).mean(1) * 255.0


# ----------------------------------------------------------------------------------------------------------------
# Style distance


class StyleDistance:
    """Style distance on Gram statistics of a fixed, seeded random VGG16 (the same for every engine and run).

    Parameters
    ----------
    seed : int
        Seed of the random weights; keep the default so that distances compare across runs.
    layers : tuple of str
        VGG16 layers whose Gram matrices are compared.
    device : str or torch.device
        Where the network runs.
    """

    def __init__(self, seed: int = 0, layers: tuple[str, ...] = STYLE_LAYERS, device: str = "cpu"):
        from stda_hf.models.features import build_vgg_features

        self.layers = tuple(layers)
        self.net = build_vgg_features("vgg16", self.layers, weights="random", seed=seed).to(device)

    @torch.no_grad()
    def grams(self, images: Tensor) -> dict[str, Tensor]:
        """Normalised Gram matrices ``F F^T / (C H W)`` of RGB images (B, 3, H, W) in [0, 1]."""
        from stda_hf.generate.nst import gram

        p = next(self.net.parameters())
        acts = self.net(images.to(p.device, p.dtype))
        return {layer: gram(acts[layer]) for layer in self.layers}

    @torch.no_grad()
    def __call__(self, images: Tensor, styles: Tensor) -> Tensor:
        """Mean over layers of ``|G(image) - G(style)|_F / |G(style)|_F`` per pair: (B,)."""
        a, b = self.grams(images), self.grams(styles)
        per_layer = [
            (a[k] - b[k]).flatten(1).norm(dim=1) / b[k].flatten(1).norm(dim=1).clamp_min(1e-12)
            for k in self.layers
        ]
        return torch.stack(per_layer).mean(0).cpu()


# ----------------------------------------------------------------------------------------------------------------
# The gate


def verdict(style_reduction: float, structure: float, gate: QualityGate | None = None) -> str:
    """``content_lost`` (structure below the bound), else ``unchanged`` (too little style), else ``ok``."""
    gate = gate or QualityGate()
    if not structure >= gate.min_structure:  # NaN counts as lost
        return "content_lost"
    if not style_reduction >= gate.min_style_reduction:
        return "unchanged"
    return "ok"


def assess(
    content: Tensor,
    style: Tensor,
    result: Tensor,
    scorer: StyleDistance,
    mask: Tensor | None = None,
    gate: QualityGate | None = None,
    terms: list[dict[str, float]] | None = None,
) -> list[QualityRecord]:
    """Quality records of a batch of results.

    Parameters
    ----------
    content, result : Tensor
        Content images and results (B, 3, H, W), RGB in [0, 1], of the same size.
    style : Tensor
        Style images (B, 3, h, w) in [0, 1].
    scorer : StyleDistance
        The fixed network of the style distance.
    mask : Tensor, optional
        Lesion masks (B, H, W), bool or in [0, 1] (thresholded at 0.5), of the content images.
    gate : QualityGate, optional
        Thresholds (default: :class:`QualityGate`'s).
    terms : list of dict, optional
        Per image, the engine's loss terms to keep in the record (e.g. ``StylizeResult.terms(i)``).

    Raises
    ------
    StdaError
        Content and result of different shapes.
    """
    if content.shape != result.shape:
        raise StdaError(f"content {tuple(content.shape)} and result {tuple(result.shape)} differ in shape")
    before, after = scorer(content, style), scorer(result, style)
    reduction = 1 - after / before.clamp_min(1e-12)
    ssim_ = ssim(luminance(result.double()), luminance(content.double())).cpu()
    iou = iou_content = None
    if mask is not None:
        truth = (mask > 0.5).to(result.device)
        iou = mask_iou(lesion_outline(result.double()), truth).cpu()
        iou_content = mask_iou(lesion_outline(content.double()), truth).cpu()
    change = mean_abs_change(result, content).cpu()
    records = []
    for i in range(len(content)):
        m = mc = kept = None
        if iou is not None:
            m, mc = float(iou[i]), float(iou_content[i])
            kept = min(1.0, m / mc) if mc >= MIN_CONTENT_IOU else None
        structure = float(ssim_[i]) if kept is None else min(float(ssim_[i]), kept)
        records.append(
            QualityRecord(
                style_before=float(before[i]),
                style_after=float(after[i]),
                style_reduction=float(reduction[i]),
                ssim=float(ssim_[i]),
                mask_iou=m,
                content_mask_iou=mc,
                lesion_kept=kept,
                structure=structure,
                mean_abs_change=float(change[i]),
                verdict=verdict(float(reduction[i]), structure, gate),
                terms=dict(terms[i]) if terms else {},
            )
        )
    return records
