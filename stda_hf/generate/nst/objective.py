"""The style-transfer objectives: Gram matrices, the ``gatys`` and ``inetwork`` loss terms, style targets, colour.

Pure tensor functions of a batch: every loss is per image, a (B,) tensor, so an image's loss never depends on
the other images of its batch.

``gatys`` (the ``default`` preset; the conventions of the PyTorch tutorial and Johnson's neural-style, so that
weights do not depend on the image size): RGB images in [0, 1] with torchvision's normalisation; content loss
the mean squared difference of the content-layer activations; a Gram matrix ``F F^T / (C H W)`` of the
(optionally shifted) activations, computed in fp32; a layer's style loss the mean squared difference of Gram
matrices, the style loss their weighted sum; total variation the mean of squared neighbour differences of the
image in [0, 1]. ``inetwork`` (the ``original`` preset) is the objective of titu1994's Neural-Style-Transfer
``INetwork.py``, which the original work ran: its unnormalised sums on Caffe input (:func:`loss_terms`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stda_hf.core.errors import StdaError
from stda_hf.generate.nst.config import COARSE_SCALE, NSTConfig
from stda_hf.models.features import VGGFeatures, from_caffe, to_caffe

# ----------------------------------------------------------------------------------------------------------------
# Losses (per image: every function returns a (B,) tensor)


def gram(features: Tensor, shift: float = 0.0, normalise: bool = True) -> Tensor:
    """Gram matrices ``(F + shift)(F + shift)^T`` of activations (B, C, H, W), at least fp32: (B, C, C).

    Divided by ``C H W`` when ``normalise`` (the ``gatys`` objective); INetwork's are not.
    """
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        f = at_least_fp32(features).reshape(b, c, h * w)
        if shift:
            f = f + shift
        alpha = 1.0 / (c * h * w) if normalise else 1.0
        return torch.baddbmm(f.new_empty(b, c, c), f, f.transpose(1, 2), beta=0.0, alpha=alpha)


REGIONS_SUFFIX = "@regions"
"""Suffix of a style layer's per-region Gram targets ``(B, R, C, C)`` in a targets dict (region-aware transfer)."""
PRESENT = "@present"
"""Key of the style regions that carry statistics, ``(B, R)``, in a targets dict (region-aware transfer)."""
MIN_REGION_SHARE = 0.005
"""A region with less than this share of an image's pixels has no statistics (its style term is left out)."""


def region_key(layer: str) -> str:
    """The name of a style layer's per-region Gram targets in a targets dict."""
    return layer + REGIONS_SUFFIX


def masked_gram(features: Tensor, masks: Tensor, shift: float = 0.0, normalise: bool = True) -> Tensor:
    """Gram matrices of activations (B, C, H, W) inside soft region masks (B, R, H, W): (B, R, C, C), fp32.

    ``sum_p m_p (F_p + shift)(F_p + shift)^T`` over the pixels ``p`` of each region (INetwork.py's masked Gram
    for binary masks), divided by ``C`` times the region's mass when ``normalise``: the ``gatys`` Gram of the
    region alone, whatever its size, so that a mask of ones gives :func:`gram` exactly.
    """
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        f = at_least_fp32(features).reshape(b, 1, c, h * w)
        if shift:
            f = f + shift
        m = at_least_fp32(masks).reshape(b, -1, 1, h * w)
        g = (f * m) @ f.transpose(-1, -2)
        if normalise:
            g = g / (c * m.sum(-1, keepdim=True)).clamp_min(1e-8)
        return g


def layer_masks(regions: Tensor, size: Sequence[int]) -> Tensor:
    """Region masks (B, R, H, W) at a feature map's ``size`` (h, w): the share of each cell inside the region."""
    if tuple(regions.shape[-2:]) == tuple(size):
        return regions
    return F.adaptive_avg_pool2d(at_least_fp32(regions), tuple(size))


def region_present(regions: Tensor) -> Tensor:
    """Which regions carry statistics: masks (..., R, H, W) -> (..., R) bool (share >= :data:`MIN_REGION_SHARE`)."""
    return regions.flatten(-2).mean(-1) >= MIN_REGION_SHARE


def region_weights(regions: Tensor, style_present: Tensor) -> Tensor:
    """Per image and region, the weight of its style term (B, R): regions present in both the content
    (:func:`region_present`) and the style, equally weighted, summing to 1 (0 when none is)."""
    both = region_present(regions) & style_present.bool()
    both = both.to(torch.float32)
    return both / both.sum(1, keepdim=True).clamp_min(1.0)


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in fp32, or in its own dtype when that is wider (fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """Mean squared difference per image of content-layer activations (B, C, H, W): (B,)."""
    return (at_least_fp32(features) - at_least_fp32(target)).square().flatten(1).mean(1)


def style_loss(grams: dict[str, Tensor], targets: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Weighted sum over layers of the mean squared Gram difference per image: (B,)."""
    return sum(
        w * (grams[layer] - targets[layer]).square().flatten(1).mean(1) for layer, w in weights.items()
    )


def tv_loss(images: Tensor) -> Tensor:
    """Total variation per image: mean of squared horizontal plus vertical neighbour differences, (B,)."""
    dy = images[:, :, 1:, :-1] - images[:, :, :-1, :-1]
    dx = images[:, :, :-1, 1:] - images[:, :, :-1, :-1]
    return (dx.square() + dy.square()).flatten(1).mean(1)


def inetwork_content_loss(features: Tensor, target: Tensor) -> Tensor:
    """INetwork's default content loss (``content_loss_type`` 0): the plain sum of squared differences, (B,)."""
    return (at_least_fp32(features) - at_least_fp32(target)).square().flatten(1).sum(1)


def inetwork_style_loss(
    grams: dict[str, Tensor], targets: dict[str, Tensor], weights: dict[str, float], rows: int, cols: int
) -> Tensor:
    """INetwork's style loss: per layer ``sum((S - G)^2) / (4 * 3^2 * (rows * cols)^2)``, weighted, summed: (B,).

    INetwork fixes the channel count at 3 and uses the input image's ``rows * cols`` for every layer; Grams are
    unnormalised (:func:`gram` with ``normalise=False``). ``weights`` are :func:`inetwork_layer_weights`.
    """
    denominator = 4.0 * 3**2 * float(rows * cols) ** 2
    return sum(
        w * (grams[layer] - targets[layer]).square().flatten(1).sum(1) / denominator
        for layer, w in weights.items()
    )


def region_style_loss(
    acts: dict[str, Tensor],
    regions: Tensor,
    targets: dict[str, Tensor],
    weights: dict[str, float],
    cfg: NSTConfig,
    image_size: tuple[int, int],
) -> Tensor:
    """The style loss inside regions: per layer and region the loss of the objective (``gatys``: mean squared
    Gram difference; ``inetwork``: its normalised sum) between the region's Gram matrices and its targets
    (``targets[region_key(layer)]``, (B, R, C, C)), weighted by :func:`region_weights`, summed: (B,)."""
    inetwork = cfg.objective == "inetwork"
    per_region = region_weights(regions, targets[PRESENT])
    total = 0.0
    for layer, w in weights.items():
        g = masked_gram(
            acts[layer], layer_masks(regions, acts[layer].shape[-2:]), cfg.gram_shift, not inetwork
        )
        diff = (g - targets[region_key(layer)]).square().flatten(2)
        if inetwork:
            per = diff.sum(2) / (4.0 * 3**2 * float(image_size[0] * image_size[1]) ** 2)
        else:
            per = diff.mean(2)
        total = total + w * (per * per_region).sum(1)
    return total


def inetwork_tv_loss(images: Tensor) -> Tensor:
    """INetwork's total variation: ``sum((a + b)^1.25)`` over ``[:H-1, :W-1]`` of the image in its units, (B,).

    ``a`` and ``b`` are the squared differences to the pixel below and to the right.
    """
    x = at_least_fp32(images)
    corner = x[:, :, :-1, :-1]
    a = (corner - x[:, :, 1:, :-1]).square()
    b = (corner - x[:, :, :-1, 1:]).square()
    return (a + b).pow(1.25).flatten(1).sum(1)


@dataclass
class Losses:
    """Per-image losses (each (B,)): unweighted terms and the weighted total that is optimised."""

    content: Tensor
    style: Tensor
    tv: Tensor
    total: Tensor


def to_space(rgb: Tensor, cfg: NSTConfig) -> Tensor:
    """RGB images in [0, 1] in the objective's units: themselves (``gatys``) or Caffe's (``inetwork``)."""
    return to_caffe(rgb) if cfg.objective == "inetwork" else rgb


def from_space(x: Tensor, cfg: NSTConfig) -> Tensor:
    """Inverse of :func:`to_space` (no clipping)."""
    return from_caffe(x) if cfg.objective == "inetwork" else x


def activations(features: VGGFeatures, x: Tensor, cfg: NSTConfig) -> dict[str, Tensor]:
    """VGG activations of images ``x`` given in the objective's units (see :func:`to_space`).

    The network always sees its own weights' input convention: ``inetwork``'s Caffe units go in as they are to
    Caffe-trained weights (``vgg19-imagenet``, Keras ``.h5``) and are converted back to RGB, then normalised, for
    torchvision-convention weights (never fed as they are: 0-255 BGR into a network trained on normalised RGB).
    """
    if cfg.objective != "inetwork":
        return features(x)
    return features.activations(x) if features.input_space == "caffe" else features(from_space(x, cfg))


def objective(
    features: VGGFeatures,
    images: Tensor,
    content_target: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    precision: str = "fp32",
    regions: Tensor | None = None,
) -> Losses:
    """Content, style and TV losses of ``images`` (B, 3, H, W), in the objective's units, against per-image targets.

    ``images`` are RGB in [0, 1] for ``gatys`` and Caffe-preprocessed (:func:`to_space`) for ``inetwork``;
    ``content_target`` comes from :func:`content_features`, ``targets`` from :func:`style_targets`. With
    ``regions`` (B, R, H, W), the content images' region masks, the style term is region-aware: each region's
    Gram matrices (:func:`masked_gram`) against the targets of the same region (``targets`` from
    :func:`style_targets` given the style's regions), the regions present in both images equally weighted.
    """
    with autocast(precision, images.device):
        acts = activations(features, images, cfg)
    layer_weights = cfg.style_layer_weights()
    inetwork = cfg.objective == "inetwork"
    if regions is None:
        grams = {layer: gram(acts[layer], cfg.gram_shift, normalise=not inetwork) for layer in layer_weights}
    if inetwork:
        c = inetwork_content_loss(acts[cfg.content_layer], content_target)
        if regions is None:
            s = inetwork_style_loss(grams, targets, layer_weights, *images.shape[-2:])
        tv = inetwork_tv_loss(images) if cfg.tv_weight else torch.zeros_like(c)
    else:
        c = content_loss(acts[cfg.content_layer], content_target)
        if regions is None:
            s = style_loss(grams, targets, layer_weights)
        tv = tv_loss(at_least_fp32(images)) if cfg.tv_weight else torch.zeros_like(c)
    if regions is not None:
        s = region_style_loss(acts, regions, targets, layer_weights, cfg, tuple(images.shape[-2:]))
    total = cfg.content_weight * c + cfg.style_weight * s + cfg.tv_weight * tv
    return Losses(content=c, style=s, tv=tv, total=total)


@torch.no_grad()
def content_features(
    features: VGGFeatures, content: Tensor, cfg: NSTConfig, precision: str = "fp32"
) -> Tensor:
    """The content-layer activations of content images (B, 3, H, W), RGB in [0, 1], at least fp32."""
    with autocast(precision, content.device):
        acts = activations(features, to_space(model_input(content, cfg), cfg), cfg)
    return at_least_fp32(acts[cfg.content_layer])


@dataclass
class TermsAndGrads:
    """Per-image loss terms and their input gradients (see :func:`inetwork_terms`)."""

    terms: dict[str, Tensor]  # content, style, tv, total: (B,) each
    grads: dict[str, Tensor]  # the gradient of each term with respect to the images: (B, 3, H, W) each


def loss_terms(
    features: VGGFeatures,
    images: Tensor,
    content: Tensor,
    style: Tensor,
    cfg: NSTConfig,
    space: str = "rgb",
    dtype: torch.dtype | None = torch.float64,
    weighted: bool = True,
) -> TermsAndGrads:
    """Each loss term of ``cfg``'s objective and its gradient with respect to the input, per image.

    For ``NSTConfig(preset="original")`` these are INetwork.py's terms: ``content`` is
    ``content_weight * sum((F - P)^2)`` at the content layer, ``style`` the sum over adjacent layer pairs of
    ``style_weight / 2^(L - (i + 1)) * (sl_i - sl_{i+1})``, ``tv`` is ``tv_weight * sum((a + b)^1.25)``, and
    ``total`` their sum: the value and gradient INetwork's ``f_outputs`` return for a one-style run.

    Parameters
    ----------
    features : VGGFeatures
        The network (copied, not changed, when ``dtype`` differs from its own).
    images, content, style : Tensor
        Result, content and style images (B, 3, H, W), all the same size (INetwork resizes the style image to
        the content's). RGB in [0, 1] when ``space="rgb"``; in the objective's units (Caffe's BGR, 0-255 minus
        the ImageNet mean, for ``inetwork``) when ``space="script"``.
    cfg : NSTConfig
        The objective and its weights.
    space : {"rgb", "script"}
        Units of the images and of the returned gradients.
    dtype : torch.dtype, optional
        Compute in this dtype (default float64); None keeps the images' dtype.
    weighted : bool
        Terms as they enter the total (times their weights), or unweighted.

    Returns
    -------
    TermsAndGrads
        ``terms[name]`` (B,) and ``grads[name]`` (B, 3, H, W) for ``content``, ``style``, ``tv``, ``total``.

    Raises
    ------
    StdaError
        Unknown ``space``; images of different sizes.
    """
    if space not in ("rgb", "script"):
        raise StdaError(f"unknown space {space!r}; valid values: ['rgb', 'script']")
    if not images.shape == content.shape == style.shape:
        raise StdaError(
            f"images {tuple(images.shape)}, content {tuple(content.shape)} and style {tuple(style.shape)} "
            "must have the same shape (INetwork resizes the style image to the content image's size)"
        )
    if dtype is not None and next(features.parameters()).dtype != dtype:
        features = copy.deepcopy(features).to(dtype)
    images, content, style = (t.to(dtype) if dtype is not None else t for t in (images, content, style))
    x = images.detach().clone().requires_grad_(True)
    unit = x if space == "script" else to_space(model_input(x, cfg), cfg)
    if space == "script":
        content, style = from_space(content, cfg), from_space(style, cfg)
    target = content_features(features, content, cfg)
    losses = objective(features, unit, target, style_targets(features, style, cfg), cfg)
    weights = {"content": cfg.content_weight, "style": cfg.style_weight, "tv": cfg.tv_weight, "total": 1.0}
    terms, grads = {}, {}
    for name, w in weights.items():
        value = getattr(losses, name) * (w if weighted or name == "total" else 1.0)
        (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=name != "total", allow_unused=True)
        terms[name] = value.detach()
        grads[name] = torch.zeros_like(x) if grad is None else grad
    return TermsAndGrads(terms, grads)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision="bf16"``, else a context that changes nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 on a CUDA GPU that supports it, fp32 elsewhere.

    On CPUs, bf16 (even with native AVX512-BF16) gained too little once images that L-BFGS lost in bf16 are
    redone in fp32 (see ``benchmarks/nst_throughput.py``); ``--precision bf16`` still uses it.
    """
    device = torch.device(device)
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


# ----------------------------------------------------------------------------------------------------------------
# Colour


def rgb_to_ycbcr(images: Tensor) -> Tensor:
    """Full-range (JPEG) YCbCr of RGB images in [0, 1]; Cb and Cr are centred on 0.5."""
    r, g, b = images.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 0.5 + (b - y) * 0.564
    cr = 0.5 + (r - y) * 0.713
    return torch.stack((y, cb, cr), 1)


def ycbcr_to_rgb(ycbcr: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_ycbcr`."""
    y, cb, cr = ycbcr.unbind(1)
    r = y + (cr - 0.5) / 0.713
    b = y + (cb - 0.5) / 0.564
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return torch.stack((r, g, b), 1)


def luminance3(images: Tensor) -> Tensor:
    """The luminance of RGB images repeated on three channels (what ``luminance`` colour mode optimises)."""
    return rgb_to_ycbcr(images)[:, :1].expand(-1, 3, -1, -1).contiguous()


def keep_color(result: Tensor, content: Tensor) -> Tensor:
    """The luminance of ``result`` with the chroma (Cb, Cr) of ``content``, clamped to [0, 1]."""
    y = rgb_to_ycbcr(result)[:, :1]
    return ycbcr_to_rgb(torch.cat((y, rgb_to_ycbcr(content)[:, 1:]), 1)).clamp(0, 1)


def model_input(images: Tensor, cfg: NSTConfig) -> Tensor:
    """What the network sees of RGB images: their luminance on three channels in ``luminance`` mode, else them."""
    return luminance3(images) if cfg.preserve_color == "luminance" else images


# ----------------------------------------------------------------------------------------------------------------
# Style targets


@torch.no_grad()
def style_targets(
    features: VGGFeatures, styles: Tensor, cfg: NSTConfig, regions: Tensor | None = None
) -> dict[str, Tensor]:
    """Gram targets of style images (B, 3, h, w) in [0, 1], computed in fp32: ``{layer: (B, C, C)}``.

    With ``cfg.coarse_to_fine``, also the targets of the styles at half size, under :func:`coarse_key` names,
    for the coarse stage (the style's texture keeps its size relative to the image). With ``regions``
    (B, R, h, w), the style images' region masks, also each region's Gram targets under :func:`region_key`
    names, (B, R, C, C), and which regions carry statistics under :data:`PRESENT`, (B, R).
    """
    out = _grams(features, styles, cfg, regions)
    if cfg.coarse_to_fine:
        size = scaled_size(styles.shape[-2:], COARSE_SCALE)
        half = None if regions is None else layer_masks(regions, size)
        out.update({coarse_key(k): v for k, v in _grams(features, resize(styles, size), cfg, half).items()})
    if regions is not None:
        out[PRESENT] = region_present(regions)
    return out


def _grams(
    features: VGGFeatures, styles: Tensor, cfg: NSTConfig, regions: Tensor | None = None
) -> dict[str, Tensor]:
    acts = activations(features, to_space(model_input(styles, cfg), cfg), cfg)
    normalise = cfg.objective != "inetwork"
    out = {layer: gram(acts[layer], cfg.gram_shift, normalise) for layer in cfg.style_layers}
    if regions is not None:
        for layer in cfg.style_layers:
            masks = layer_masks(regions, acts[layer].shape[-2:])
            out[region_key(layer)] = masked_gram(acts[layer], masks, cfg.gram_shift, normalise)
    return out


def coarse_key(layer: str) -> str:
    """The name of a style layer's coarse-stage target in :func:`style_targets`'s dict."""
    return f"coarse/{layer}"


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Images (B, C, H, W) resized to ``size`` (bilinear, antialiased when shrinking); per image."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """``(H, W)`` times ``scale``, rounded, at least one pixel a side."""
    return tuple(max(1, round(side * scale)) for side in size)
