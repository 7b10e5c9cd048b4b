"""Region-aware style transfer: which part of a style image styles which part of a content image.

Whole-frame style transfer moves everything the style image holds into the content image: its lesion texture,
and also its ruler ticks, ink marks, stickers and dermoscope vignette (the known shortcuts of ISIC data). With
lesion masks on both sides, ``--regions`` restricts what moves where:

``lesion-skin``
    The style's lesion statistics go into the content's lesion, the statistics of the style's *perilesional
    skin* into the content's skin. Perilesional skin is the ring around the style's lesion, as wide as the
    lesion's equivalent radius, without near-black pixels and without colour outliers: the frame edges and
    corners, where rulers, stickers and vignettes sit, are outside it, and an ink mark or sticker inside it
    is left out by its colour. What still gets through is measured by ``benchmarks/artifact_copy.py``.
``lesion``
    Only the lesion is restyled; the content's skin keeps its own statistics.
``none``
    The whole style frame into the whole content frame (the paper's method, and every run before regions).
``auto`` (default)
    ``lesion-skin`` for each pair whose content and style images both have a mask, ``none`` for the others.

A region is a soft mask (1 inside); :func:`content_regions` and :func:`style_regions` give them as (R, H, W)
tensors in :data:`REGIONS` order (:func:`~stda_hf.generate.nst.region_present` says which have enough pixels
to carry statistics). The engines (:mod:`stda_hf.generate.engines`) use them: Gatys matches Gram matrices inside each
region (INetwork.py's ``--style_masks``/``--content_mask``), the arbitrary network renders each region with
its own style vector and composites the renders through the content's mask.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from stda_hf.core.errors import StdaError
from stda_hf.generate.nst import region_present

REGION_MODES = ("auto", "lesion-skin", "lesion", "none")
REGIONS = ("lesion", "skin")
DARK = 0.1
"""Style pixels darker than this luminance (0-1) are never skin statistics: vignettes, ink, black frames."""
OUTLIER = 3.0
"""A ring pixel whose colour is further than this many times the ring's median distance from the ring's median
colour is not skin (ink, a sticker, a ruler tick)."""
MIN_OUTLIER = 0.08
"""The colour distance (RGB in [0, 1]) below which no pixel is an outlier: plain skin's grain stays skin."""


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`REGION_MODES`; else a StdaError naming it and the choices."""
    if mode not in REGION_MODES:
        raise StdaError(f"unknown --regions {mode!r}; valid values: {list(REGION_MODES)}")
    return mode


def pair_mode(mode: str, content_has_mask: bool, style_has_mask: bool) -> str:
    """The region mode a pair is made with: ``auto`` resolved, and ``none`` where a mask is missing (both
    region modes take the style's lesion, so both need both masks)."""
    check_mode(mode)
    if mode == "none" or not (content_has_mask and style_has_mask):
        return "none"
    return "lesion-skin" if mode == "auto" else mode


def content_regions(mask: Tensor) -> Tensor:
    """The content image's regions (2, H, W) float: its lesion mask and everything else (skin)."""
    lesion = mask.float()
    return torch.stack((lesion, 1.0 - lesion))


def perilesional_skin(mask: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """The ring of skin around a lesion mask (H, W) bool: as wide as the lesion's equivalent radius, clipped
    to the frame, without the lesion. With ``image`` (H, W, 3) in [0, 1], also without near-black pixels
    (below :data:`DARK`: vignettes, black frames) and without colour outliers: pixels further from the ring's
    median colour than :data:`OUTLIER` times the ring's median distance to it (ink, stickers, ruler ticks)."""
    area = int(mask.sum())
    radius = max(2.0, float(np.sqrt(area / np.pi)))
    ring = (ndimage.distance_transform_edt(~mask) <= radius) & ~mask
    if image is None or not ring.any():
        return ring
    ring &= image @ np.array([0.299, 0.587, 0.114]) >= DARK
    if ring.sum() < 8:
        return ring
    colours = image[ring]
    distance = np.linalg.norm(image - np.median(colours, axis=0), axis=-1)
    limit = max(MIN_OUTLIER, OUTLIER * float(np.median(distance[ring])))
    return ring & (distance <= limit)


def style_regions(image: Tensor, mask: Tensor) -> Tensor:
    """A style image's regions (2, H, W) float: its lesion and its perilesional skin (:func:`perilesional_skin`).

    ``image`` is (3, H, W) in [0, 1], ``mask`` (H, W) bool at the same size.
    """
    if tuple(image.shape[-2:]) != tuple(mask.shape):
        raise StdaError(
            f"style image {tuple(image.shape[-2:])} and its mask {tuple(mask.shape)} differ in size"
        )
    lesion = mask.cpu().numpy().astype(bool)
    skin = perilesional_skin(lesion, image.detach().float().permute(1, 2, 0).cpu().numpy())
    return torch.from_numpy(np.stack((lesion, skin))).float().to(image.device)


def fill_outside(image: Tensor, region: Tensor) -> Tensor:
    """``image`` (3, H, W) with the pixels outside ``region`` (H, W) set to the region's mean colour: what a
    network is shown of one region. The whole frame keeps the region's texture at its own scale."""
    inside = region > 0.5
    mean = image[:, inside].mean(1)
    return torch.where(inside[None], image, mean[:, None, None])


def feather(mask: Tensor, share: float = 0.02) -> Tensor:
    """A lesion mask (H, W) softened at its border (Gaussian, sigma ``share`` of the shorter side, at least
    0.5 pixel), (1, H, W) float: composites through it show no seam."""
    sigma = max(0.5, share * min(mask.shape[-2:]))
    radius = max(1, round(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(mask.device)
    m = mask.float()[None, None]
    m = torch.nn.functional.pad(m, (radius, radius, radius, radius), mode="replicate")
    m = torch.nn.functional.conv2d(m, kernel.view(1, 1, 1, -1))
    m = torch.nn.functional.conv2d(m, kernel.view(1, 1, -1, 1))
    return m[0]


def gate_weights(modes: list[str], masks: list[Tensor | None], style_present: Tensor) -> Tensor:
    """Per image, the weight of each region in the quality gate's style measure (B, R): the lesion alone, for a
    region-aware image whose content and style both have one; 0 (the whole frame is measured) otherwise.

    The lesion is where the malignant texture is sent in both modes; the skin only trades skin for skin, whose
    statistics were close to begin with, so averaging it in would call restyled lesions ``unchanged``.
    """
    weights = torch.zeros(len(modes), len(REGIONS))
    for i, (mode, mask) in enumerate(zip(modes, masks, strict=True)):
        lesion = mask is not None and region_present(content_regions(mask))[0]
        if mode != "none" and lesion and style_present[i][0]:
            weights[i, 0] = 1.0
    return weights
