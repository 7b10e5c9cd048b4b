"""The style-transfer engine: Gram matrices, content/style/TV losses and batched, per-image-independent optimisation.

Pure tensor code (no files): :func:`style_targets` turns style images into Gram targets once, and
:func:`stylize` optimises a batch of images, each towards its own content image and style targets. Every image
has its own optimiser state (the batched L-BFGS keeps per-image curvature pairs, step sizes and stopping), so an
image's result does not depend on which other images share its batch::

    features = build_vgg_features("vgg19", cfg.layers(), weights="random")
    targets = style_targets(features, style_images, cfg)           # {layer: (B, C, C)}
    result = stylize(features, content_images, targets, cfg, seeds=[0, 1])
    result.images                                                  # (B, 3, H, W) in [0, 1]

Two objectives. ``gatys`` (the ``default`` preset; the conventions of the PyTorch tutorial and Johnson's
neural-style, so that weights do not depend on the image size): RGB images in [0, 1] with torchvision's
normalisation; content loss the mean squared difference of the content-layer activations; a Gram matrix
``F F^T / (C H W)`` of the (optionally shifted) activations, computed in fp32; a layer's style loss the mean
squared difference of Gram matrices, the style loss their weighted sum; total variation the mean of squared
neighbour differences of the image in [0, 1]. ``inetwork`` (the ``original`` preset) is the objective of titu1994's
Neural-Style-Transfer ``INetwork.py``, which the original work ran: see :func:`inetwork_objective`.

The optimiser (:class:`BatchedLBFGS`) works at any feature scale: its tolerances are relative to each image's
initial loss and gradient, its curvature test is scale-free, and every image has its own backtracking line
search, so multiplying the loss by any constant leaves every image's path unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import StdaError
from .models.features import POOLINGS, VGGFeatures, conv_layer_names, from_caffe, to_caffe

logger = logging.getLogger(__name__)

OPTIMIZERS = ("lbfgs", "adam")
OBJECTIVES = ("gatys", "inetwork")
INITS = ("content", "noise", "gray")
PRECISIONS = ("auto", "fp32", "bf16")
COLOR_MODES = ("none", "luminance", "ycbcr")
LAYER_WEIGHTINGS = ("uniform", "geometric", "inetwork")
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}
COARSE_SCALE = 0.5
"""Side of the coarse stage's images relative to the output (``coarse_to_fine``)."""
MIN_COARSE_SIDE = 64
"""No coarse stage when its images would be smaller than this: at 32 px, VGG's conv4 layers are 4x4 pixels and
the coarse result lost the lesion outline on phantoms (``benchmarks/nst_figure.py --thresholds``)."""
STRAY_TOLERANCE = 1.02
"""A bf16 image whose final loss exceeds this times the lowest loss it reached is redone in fp32."""

PRESETS: dict[str, dict] = {
    # Gatys et al. (2016) style layers on VGG19, with the PyTorch tutorial's weights for these loss conventions;
    # content at conv3_1 (not conv4_2): with conv4_2 the lesion outline was lost on 1 of 8 phantom pairs, with
    # conv3_1 on none (benchmarks/nst_figure.py --thresholds, random weights). No coarse-to-fine: at 128 px it
    # ended 8% above the full-size run's loss on one of two pairs (benchmarks/nst_throughput.py).
    "default": {
        "arch": "vgg19",
        "content_layer": "conv3_1",
        "style_layers": ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"),
        "layer_weights": "uniform",
        "content_weight": 1.0,
        "style_weight": 1e6,
        "tv_weight": 0.0,
        "gram_shift": 0.0,
        "pooling": "max",
        "init": "content",
        "objective": "gatys",
        "history": 100,
        "restart": 0,
        "clamp": True,
        "coarse_to_fine": 0.0,
    },
    # titu1994's INetwork.py (the original work's Keras run) with its defaults: VGG16 on Caffe input, every
    # convolution a style layer with INetwork's adjacent-layer weights, Gram matrices of activations - 1, its
    # unnormalised sums, and num_iter rounds of scipy's L-BFGS-B with maxfun=20 (history m=10), no clamping.
    "original": {
        "arch": "vgg16",
        "content_layer": "conv5_2",
        "style_layers": ("all",),
        "layer_weights": "inetwork",
        "content_weight": 0.025,
        "style_weight": 1.0,
        "tv_weight": 8.5e-5,
        "gram_shift": -1.0,
        "pooling": "max",
        "init": "content",
        "objective": "inetwork",
        "history": 10,
        "restart": 20,
        "clamp": False,
        "coarse_to_fine": 0.0,
    },
}


@dataclass
class NSTConfig:
    """Settings of the style-transfer engine; settings left unset come from ``preset``."""

    preset: str = "default"  # default (Gatys, VGG19) or original (the paper's settings); set values win
    arch: str | None = None  # network: vgg19 or vgg16 (unset: from --preset)
    content_layer: str | None = None  # content layer, e.g. conv4_2 or conv5_2 (unset: from --preset)
    style_layers: tuple[str, ...] = ()  # style layers, e.g. conv1_1 conv3_1, or all (unset: from --preset)
    layer_weights: str | None = (
        None  # style-layer weights: uniform, geometric or numbers "1,0.5,.." (unset: preset)
    )
    content_weight: float | None = None  # weight of the content loss (unset: from --preset)
    style_weight: float | None = None  # weight of the style loss (unset: from --preset)
    tv_weight: float | None = None  # weight of the total-variation loss (unset: from --preset)
    gram_shift: float | None = None  # added to activations in the Gram matrix; original: -1 (unset: preset)
    pooling: str | None = None  # max or avg pooling between VGG blocks (unset: from --preset)
    init: str | None = None  # start image: content, noise or gray (unset: from --preset)
    objective: str | None = None  # gatys (mean losses, RGB) or inetwork (INetwork.py's sums) (unset: preset)
    style_scale: float = 1.0  # side of the style image relative to the output side
    preserve_color: str = "none"  # none, luminance (transfer luminance only) or ycbcr (keep content's Cb/Cr)
    optimizer: str = "lbfgs"  # lbfgs (per-image history and line search) or adam
    lr: float | None = None  # step size (unset: 1.0 for lbfgs, 0.02 for adam)
    iterations: int = 100  # optimiser evaluations (forward+backward passes) per image
    history: int | None = None  # L-BFGS curvature pairs kept per image (unset: preset, 100 or 10)
    restart: int | None = None  # restart L-BFGS every N evaluations, as maxfun does; 0: never (unset: preset)
    clamp: bool | None = None  # keep pixels in [0, 1] after every step (unset: preset, yes or no)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16 autocast (Grams always fp32)
    fp32_finish: float = 0.25  # in bf16, this share of the evaluations is done last, in fp32
    coarse_to_fine: float | None = None  # share of evaluations at half size first (Gatys 2017; unset: preset)
    channels_last: bool = False  # run the network on channels-last tensors (a speed setting)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise StdaError(f"unknown --preset {self.preset!r}; valid presets: {sorted(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) in (None, ()):
                setattr(self, key, value)
        self.style_layers = tuple(self.style_layers)
        if self.style_layers == ("all",):
            self.style_layers = tuple(conv_layer_names(self.arch))
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.optimizer)
        _validate(self)

    def layers(self) -> tuple[str, ...]:
        """Every layer the extractor must return: the content layer, then the style layers."""
        return tuple(dict.fromkeys((self.content_layer, *self.style_layers)))

    def style_layer_weights(self) -> dict[str, float]:
        """``{style layer: weight}`` from ``layer_weights``."""
        n = len(self.style_layers)
        if self.layer_weights == "uniform":
            values = [1.0] * n
        elif self.layer_weights == "geometric":
            values = [2.0 ** -(n - 1 - i) for i in range(n)]
        elif self.layer_weights == "inetwork":
            values = inetwork_layer_weights(n)
        else:
            values = _parse_numbers(self.layer_weights, self.style_layers)
        return dict(zip(self.style_layers, values, strict=True))


def _choice(name: str, value: object, valid: Sequence) -> None:
    if value not in valid:
        raise StdaError(f"unknown --{name.replace('_', '-')} {value!r}; valid values: {list(valid)}")


def _validate(cfg: NSTConfig) -> None:
    """Raise a :class:`StdaError` naming the first bad setting and what is valid."""
    _choice("arch", cfg.arch, ("vgg19", "vgg16"))
    valid_layers = conv_layer_names(cfg.arch)
    for layer in (cfg.content_layer, *cfg.style_layers):
        _choice("content_layer" if layer == cfg.content_layer else "style_layers", layer, valid_layers)
    _choice("pooling", cfg.pooling, POOLINGS)
    _choice("init", cfg.init, INITS)
    _choice("objective", cfg.objective, OBJECTIVES)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("preserve_color", cfg.preserve_color, COLOR_MODES)
    cfg.style_layer_weights()  # parses explicit numbers
    for name in ("content_weight", "style_weight", "tv_weight"):
        if getattr(cfg, name) < 0:
            raise StdaError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0")
    for name in ("iterations", "history"):
        if getattr(cfg, name) < 1:
            raise StdaError(f"--{name} {getattr(cfg, name)} must be at least 1")
    if cfg.restart < 0:
        raise StdaError(f"--restart {cfg.restart} must be >= 0 (0: never restart)")
    for name in ("fp32_finish", "coarse_to_fine"):
        if not 0 <= getattr(cfg, name) < 1:
            raise StdaError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be within [0, 1)")
    if not cfg.lr > 0 or not cfg.style_scale > 0:
        raise StdaError(f"--lr {cfg.lr} and --style-scale {cfg.style_scale} must be positive")


def _parse_numbers(text: str, layers: tuple[str, ...]) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != len(layers) or any(not v >= 0 for v in values):
        raise StdaError(
            f"--layer-weights {text!r}: give one of {list(LAYER_WEIGHTINGS)} or {len(layers)} comma-separated "
            f"non-negative numbers, one per style layer {list(layers)}"
        )
    return values


def inetwork_layer_weights(n: int) -> list[float]:
    """INetwork.py's per-layer style weights for ``n`` layers (style weight 1), as one coefficient per layer.

    INetwork sums ``(sl_i - sl_{i+1}) / 2^(L - (i + 1))`` over adjacent layers ``i = 0 .. n - 2`` with
    ``L = n - 1``; collected per layer that is ``2^-(n-2)`` for the first layer, ``2^-(n-1-k)`` for layer ``k``
    in between and ``-1`` for the deepest (for VGG16's 13 layers: 2^-11, 2^-11, 2^-10, ..., 0.5, -1).
    """
    if n == 1:
        return [0.0]  # INetwork's loop over adjacent pairs is empty
    values = [0.0] * n
    for i in range(n - 1):
        scale = 2.0 ** -(n - 1 - (i + 1))
        values[i] += scale
        values[i + 1] -= scale
    return values


# ----------------------------------------------------------------------------------------------------------------
# Losses (per image: every function returns a (B,) tensor)


def gram(features: Tensor, shift: float = 0.0, normalise: bool = True) -> Tensor:
    """Gram matrices ``(F + shift)(F + shift)^T`` of activations (B, C, H, W), at least fp32: (B, C, C).

    Divided by ``C H W`` when ``normalise`` (the ``gatys`` objective); INetwork's are not.
    """
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        f = _at_least_fp32(features).reshape(b, c, h * w)
        if shift:
            f = f + shift
        alpha = 1.0 / (c * h * w) if normalise else 1.0
        return torch.baddbmm(f.new_empty(b, c, c), f, f.transpose(1, 2), beta=0.0, alpha=alpha)


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """Mean squared difference per image of content-layer activations (B, C, H, W): (B,)."""
    return (_at_least_fp32(features) - _at_least_fp32(target)).square().flatten(1).mean(1)


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
    return (_at_least_fp32(features) - _at_least_fp32(target)).square().flatten(1).sum(1)


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


def inetwork_tv_loss(images: Tensor) -> Tensor:
    """INetwork's total variation: ``sum((a + b)^1.25)`` over ``[:H-1, :W-1]`` of the image in its units, (B,).

    ``a`` and ``b`` are the squared differences to the pixel below and to the right.
    """
    x = _at_least_fp32(images)
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
    """VGG activations of images ``x`` given in the objective's units (see :func:`to_space`)."""
    return features.activations(x) if cfg.objective == "inetwork" else features(x)


def objective(
    features: VGGFeatures,
    images: Tensor,
    content_target: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    precision: str = "fp32",
) -> Losses:
    """Content, style and TV losses of ``images`` (B, 3, H, W), in the objective's units, against per-image targets.

    ``images`` are RGB in [0, 1] for ``gatys`` and Caffe-preprocessed (:func:`to_space`) for ``inetwork``;
    ``content_target`` comes from :func:`content_features`, ``targets`` from :func:`style_targets`.
    """
    with _autocast(precision, images.device):
        acts = activations(features, images, cfg)
    layer_weights = cfg.style_layer_weights()
    inetwork = cfg.objective == "inetwork"
    grams = {layer: gram(acts[layer], cfg.gram_shift, normalise=not inetwork) for layer in layer_weights}
    if inetwork:
        c = inetwork_content_loss(acts[cfg.content_layer], content_target)
        s = inetwork_style_loss(grams, targets, layer_weights, *images.shape[-2:])
        tv = inetwork_tv_loss(images) if cfg.tv_weight else torch.zeros_like(c)
    else:
        c = content_loss(acts[cfg.content_layer], content_target)
        s = style_loss(grams, targets, layer_weights)
        tv = tv_loss(_at_least_fp32(images)) if cfg.tv_weight else torch.zeros_like(c)
    total = cfg.content_weight * c + cfg.style_weight * s + cfg.tv_weight * tv
    return Losses(content=c, style=s, tv=tv, total=total)


@torch.no_grad()
def content_features(
    features: VGGFeatures, content: Tensor, cfg: NSTConfig, precision: str = "fp32"
) -> Tensor:
    """The content-layer activations of content images (B, 3, H, W), RGB in [0, 1], at least fp32."""
    with _autocast(precision, content.device):
        acts = activations(features, to_space(_model_input(content, cfg), cfg), cfg)
    return _at_least_fp32(acts[cfg.content_layer])


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
    unit = x if space == "script" else to_space(_model_input(x, cfg), cfg)
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


def _autocast(precision: str, device: torch.device):
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


def _model_input(images: Tensor, cfg: NSTConfig) -> Tensor:
    return luminance3(images) if cfg.preserve_color == "luminance" else images


# ----------------------------------------------------------------------------------------------------------------
# Style targets


@torch.no_grad()
def style_targets(features: VGGFeatures, styles: Tensor, cfg: NSTConfig) -> dict[str, Tensor]:
    """Gram targets of style images (B, 3, h, w) in [0, 1], computed in fp32: ``{layer: (B, C, C)}``.

    With ``cfg.coarse_to_fine``, also the targets of the styles at half size, under :func:`coarse_key` names,
    for the coarse stage (the style's texture keeps its size relative to the image).
    """
    out = _grams(features, styles, cfg)
    if cfg.coarse_to_fine:
        half = resize(styles, _scaled(styles.shape[-2:], COARSE_SCALE))
        out.update({coarse_key(k): v for k, v in _grams(features, half, cfg).items()})
    return out


def _grams(features: VGGFeatures, styles: Tensor, cfg: NSTConfig) -> dict[str, Tensor]:
    acts = activations(features, to_space(_model_input(styles, cfg), cfg), cfg)
    normalise = cfg.objective != "inetwork"
    return {layer: gram(acts[layer], cfg.gram_shift, normalise) for layer in cfg.style_layers}


def coarse_key(layer: str) -> str:
    """The name of a style layer's coarse-stage target in :func:`style_targets`'s dict."""
    return f"coarse/{layer}"


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Images (B, C, H, W) resized to ``size`` (bilinear, antialiased when shrinking); per image."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _scaled(size: Sequence[int], scale: float) -> tuple[int, int]:
    return tuple(max(1, round(side * scale)) for side in size)


class GramCache:
    """Style targets computed once per key (style id + settings) and kept in memory, least recently used first out.

    Parameters
    ----------
    max_items : int
        Entries kept; a style's Gram matrices over all VGG16 layers take about 7 MB.
    """

    def __init__(self, max_items: int = 512):
        self.max_items = max_items
        self._items: OrderedDict[Hashable, dict[str, Tensor]] = OrderedDict()
        self.computed = 0  # how many targets were computed (misses)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get_many(
        self, keys: Sequence[Hashable], compute: Callable[[list[Hashable]], list[dict[str, Tensor]]]
    ) -> list[dict[str, Tensor]]:
        """Targets for ``keys`` (repeats allowed); ``compute(missing_keys)`` is called once for the misses."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._items]
        if missing:
            for key, value in zip(missing, compute(missing), strict=True):
                self._items[key] = value
                self.computed += 1
        for key in keys:
            self._items.move_to_end(key)
        found = [self._items[k] for k in keys]
        while len(self._items) > max(self.max_items, len(set(keys))):
            self._items.popitem(last=False)
        return found


def stack_targets(per_image: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-style targets ``{layer: (C, C)}`` into batch targets ``{layer: (B, C, C)}``."""
    return {layer: torch.stack([t[layer] for t in per_image]) for layer in per_image[0]}


# ----------------------------------------------------------------------------------------------------------------
# Optimisers (per image)


class BatchedLBFGS:
    """L-BFGS over a batch where every image has its own history, line search, step and stopping.

    Each call of :meth:`step` takes the loss and gradient at the current trial points (one batched evaluation)
    and moves every image to its next trial point. Per image: a backtracking line search accepts a trial when
    it lowers the loss by at least ``c1`` times the predicted decrease (Armijo); otherwise the step shrinks
    (quadratic interpolation, kept within [0.1, 0.5] of the last step). An accepted step adds the curvature pair
    ``(s, y)`` when ``y.s > eps |y| |s|`` (a scale-free test), then the next direction comes from the two-loop
    recursion with ``H0 = y.s / y.y``; a direction that is not a descent direction, or more than
    ``max_backtracks`` shrinks, restarts from steepest descent. The first step after a (re)start moves
    ``1 / |g|_2`` along ``-g``, as scipy's L-BFGS-B does. With ``restart`` the history is cleared every
    ``restart`` evaluations, as successive ``fmin_l_bfgs_b(maxfun=restart)`` calls do.

    Nothing depends on the scale of the loss: the tolerances are relative to each image's initial loss
    (``tolerance_change``) and initial gradient (``tolerance_grad``), so multiplying the loss by any constant
    gives the same path. An image stops (keeps its last accepted point) when its gradient or its loss change
    falls below those, or when no step lowers its loss.

    Parameters
    ----------
    x : Tensor
        The start images (B, ...), at least fp32; :meth:`step` writes the next trial points into it.
    lr : float
        Step taken along the L-BFGS direction first (1: the quasi-Newton step).
    history : int
        Curvature pairs kept per image.
    restart : int
        Clear the history every ``restart`` evaluations (0: never).
    project : callable, optional
        Maps trial points back into the feasible set (e.g. clamping to [0, 1]).
    """

    def __init__(
        self,
        x: Tensor,
        lr: float = 1.0,
        history: int = 100,
        restart: int = 0,
        project: Callable[[Tensor], Tensor] | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 2.2e-9,
        c1: float = 1e-4,
        eps: float = 1e-8,
        max_backtracks: int = 20,
    ):
        b, n = x.shape[0], x[0].numel()
        self.lr, self.m, self.restart = lr, history, restart
        self.project = project or (lambda t: t)
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        self.c1, self.eps, self.max_backtracks = c1, eps, max_backtracks
        zeros = x.new_zeros(b)
        self.s = x.new_zeros(b, history, n)  # accepted steps, one ring per image
        self.y = x.new_zeros(b, history, n)  # gradient differences
        self.rho = x.new_zeros(b, history)  # 1 / (y.s); 0 marks an empty slot
        self.ptr = torch.zeros(b, dtype=torch.long, device=x.device)  # next slot of each ring
        self.h_diag = torch.ones_like(zeros)
        self.active = torch.ones(b, dtype=torch.bool, device=x.device)
        self.evaluations = torch.zeros(b, dtype=torch.long, device=x.device)  # until the image stopped
        self.since_restart = torch.zeros_like(self.evaluations)
        self.backtracks = torch.zeros_like(self.evaluations)
        self.x = x.detach().reshape(b, -1).clone()  # last accepted points
        self.f = torch.full_like(zeros, float("inf"))
        self.g = torch.zeros_like(self.x)
        self.d = torch.zeros_like(self.x)  # search directions
        self.t = torch.zeros_like(zeros)  # trial steps along d
        self.f0 = self.g0 = None

    @property
    def best(self) -> Tensor:
        """The last accepted point of every image (B, ...): the lowest loss it reached."""
        return self.x

    @torch.no_grad()
    def step(self, x: Tensor, loss: Tensor, grad: Tensor, finite: Tensor) -> None:
        """Take the loss (B,) and gradient at the trial points ``x``; write the next trial points into ``x``."""
        b = x.shape[0]
        f = loss.detach().to(self.x.dtype)
        g = grad.reshape(b, -1).to(self.x.dtype)
        ok = torch.isfinite(f) & torch.isfinite(g).all(1)
        self.evaluations += self.active.long()
        self.since_restart += 1
        if self.f0 is None:  # the start point
            self.active &= finite & ok
            self.f0, self.g0 = f.abs(), g.abs().amax(1)
            self._accept(self.active, x.reshape(b, -1), f, g)
            self.active &= self.g0 > 0
            self._restart(self.active)
        else:
            trial = x.reshape(b, -1)
            predicted = torch.linalg.vecdot(self.g, trial - self.x)
            accept = self.active & ok & (f <= self.f + self.c1 * predicted)
            reject = self.active & ~accept
            change = self.f - f
            self._remember(accept, trial - self.x, g - self.g)
            self._accept(accept, trial, f, g)
            self.active &= ~(accept & (change <= self.tolerance_change * self.f0))
            self.active &= ~(accept & (g.abs().amax(1) <= self.tolerance_grad * self.g0))
            self._new_direction(accept & self.active)
            self._backtrack(reject, f, predicted)
        x.view(b, -1).copy_(torch.where(self.active[:, None], self._trial(), self.x))

    def _trial(self) -> Tensor:
        return self.project(self.x + self.t[:, None] * self.d)

    def _accept(self, rows: Tensor, x: Tensor, f: Tensor, g: Tensor) -> None:
        self.x = torch.where(rows[:, None], x, self.x)
        self.f = torch.where(rows, f, self.f)
        self.g = torch.where(rows[:, None], g, self.g)

    def _remember(self, rows: Tensor, s: Tensor, y: Tensor) -> None:
        """Store the curvature pair of each image in ``rows`` that passes the scale-free test, in its ring."""
        ys = torch.linalg.vecdot(y, s)
        yy = torch.linalg.vecdot(y, y)
        keep = rows & (ys > self.eps * torch.sqrt(yy * torch.linalg.vecdot(s, s)))
        idx = torch.arange(len(s), device=s.device)
        slot = self.ptr
        self.s[idx, slot] = torch.where(keep[:, None], s, self.s[idx, slot])
        self.y[idx, slot] = torch.where(keep[:, None], y, self.y[idx, slot])
        self.rho[idx, slot] = torch.where(keep, 1.0 / torch.where(keep, ys, 1.0), self.rho[idx, slot])
        self.h_diag = torch.where(keep, ys / torch.where(keep, yy, 1.0), self.h_diag)
        self.ptr = torch.where(keep, (self.ptr + 1) % self.m, self.ptr)

    def _restart(self, rows: Tensor) -> None:
        """Clear the history of ``rows`` and step along steepest descent by ``1 / |g|_2``."""
        self.rho[rows] = 0.0
        self.since_restart[rows] = 0
        self.backtracks[rows] = 0
        self.d = torch.where(rows[:, None], -self.g, self.d)
        norm = torch.linalg.vector_norm(self.g, dim=1)
        self.t = torch.where(rows, 1.0 / torch.where(norm > 0, norm, 1.0), self.t)

    def _new_direction(self, rows: Tensor) -> None:
        """L-BFGS directions for ``rows``; restart those due (``restart``) or without a descent direction."""
        due = rows & (self.since_restart >= self.restart) if self.restart else torch.zeros_like(rows)
        d = self._direction(self.g)
        descent = torch.linalg.vecdot(self.g, d) < 0
        fresh = rows & ~due & descent & (self.rho != 0).any(1)
        self.d = torch.where(fresh[:, None], d, self.d)
        self.t = torch.where(fresh, torch.full_like(self.t, self.lr), self.t)
        self.backtracks[fresh] = 0
        self._restart(rows & ~fresh)

    def _backtrack(self, rows: Tensor, f: Tensor, predicted: Tensor) -> None:
        """Shrink the step of ``rows`` (quadratic interpolation, within [0.1, 0.5] of it); restart or stop."""
        slope = predicted / self.t  # directional derivative times |d| (negative)
        rise = f - self.f - predicted
        t_quad = -slope * self.t**2 / (2 * rise)
        t_new = torch.where(torch.isfinite(t_quad), t_quad, 0.1 * self.t)
        t_new = torch.minimum(torch.maximum(t_new, 0.1 * self.t), 0.5 * self.t)
        self.t = torch.where(rows, t_new, self.t)
        self.backtracks += rows.long()
        exhausted = rows & (self.backtracks > self.max_backtracks)
        stuck = exhausted & ~(self.rho != 0).any(1)  # already on steepest descent: no step lowers the loss
        self.active &= ~stuck
        self._restart(exhausted & ~stuck)

    def _direction(self, g: Tensor) -> Tensor:
        """Two-loop recursion over each image's ring, newest pair first, for every image at once: ``-H g``."""
        idx = torch.arange(len(g), device=g.device)
        slots = [(self.ptr - 1 - j) % self.m for j in range(self.m)]
        q = -g
        alphas = []
        for slot in slots:
            a = self.rho[idx, slot] * torch.linalg.vecdot(self.s[idx, slot], q)
            q = q - a[:, None] * self.y[idx, slot]
            alphas.append(a)
        r = q * self.h_diag[:, None]
        for slot, a in zip(reversed(slots), reversed(alphas), strict=True):
            beta = self.rho[idx, slot] * torch.linalg.vecdot(self.y[idx, slot], r)
            r = r + (a - beta)[:, None] * self.s[idx, slot]
        return r


class BatchedAdam:
    """Adam on a batch of images (elementwise, hence per image); non-finite images stop moving."""

    def __init__(self, x: Tensor, lr: float = 0.02, project: Callable[[Tensor], Tensor] | None = None):
        self.opt = torch.optim.Adam([x], lr=lr)
        self.project = project
        self.x = x
        self.active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.evaluations = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    @property
    def best(self) -> Tensor:
        """The current images (Adam keeps no accepted point)."""
        return self.x.detach()

    @torch.no_grad()
    def step(self, x: Tensor, loss: Tensor, grad: Tensor, finite: Tensor) -> None:
        """One Adam step with ``grad``; images that went non-finite get a zero gradient from now on."""
        self.active &= finite & torch.isfinite(loss)
        self.evaluations += self.active.long()
        x.grad = torch.where(self.active.view(-1, *[1] * (grad.dim() - 1)), grad, 0.0)
        self.opt.step()
        x.grad = None
        if self.project is not None:
            x.copy_(self.project(x))


def make_optimizer(x: Tensor, cfg: NSTConfig) -> BatchedLBFGS | BatchedAdam:
    """The per-image optimiser ``cfg.optimizer`` for images ``x`` (in the objective's units)."""
    project = _projection(cfg) if cfg.clamp else None
    if cfg.optimizer == "adam":
        return BatchedAdam(x, lr=cfg.lr, project=project)
    history = min(cfg.history, max(cfg.iterations - 1, 1))
    return BatchedLBFGS(x, lr=cfg.lr, history=history, restart=cfg.restart, project=project)


def _projection(cfg: NSTConfig) -> Callable[[Tensor], Tensor]:
    """Clamping to [0, 1] in RGB, expressed in the objective's units (flattened (B, 3*H*W) or (B, 3, H, W))."""

    def project(x: Tensor) -> Tensor:
        shape = x.shape
        images = x.reshape(shape[0], 3, -1)[..., None]
        return to_space(from_space(images, cfg).clamp(0, 1), cfg).reshape(shape)

    return project


# ----------------------------------------------------------------------------------------------------------------
# Stylize


def initial_images(content: Tensor, init: str, seeds: Sequence[int] | None = None) -> Tensor:
    """Start images (B, 3, H, W): a copy of ``content``, seeded uniform noise (one seed per image), or gray."""
    if init == "content":
        return _at_least_fp32(content.detach().clone())
    if init == "gray":
        return _at_least_fp32(torch.full_like(content, 0.5))
    seeds = list(range(len(content))) if seeds is None else list(seeds)
    noise = [torch.rand(content.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return _at_least_fp32(torch.stack(noise).to(content.device, content.dtype))


@dataclass
class StylizeResult:
    """Output of :func:`stylize`: images, and per image the loss terms at the start and at the end.

    Terms are unweighted (``total`` is the weighted sum that is optimised), in the objective's units.
    """

    images: Tensor  # (B, 3, H, W) in [0, 1]
    content_loss: Tensor  # (B,) final
    style_loss: Tensor  # (B,) final
    tv_loss: Tensor  # (B,) final
    total_loss: Tensor  # (B,) final
    finite: Tensor  # (B,) bool: False where a loss or gradient became NaN/inf (in fp32 too)
    redone: Tensor  # (B,) bool: True where the bf16 run went wrong and the image was redone in fp32
    initial_content_loss: Tensor  # (B,) at the start image
    initial_style_loss: Tensor  # (B,)
    initial_tv_loss: Tensor  # (B,)
    initial_total_loss: Tensor  # (B,)
    evaluations: Tensor  # (B,) long: loss evaluations made before the image stopped (or all of them)

    def replace_rows(self, rows: Tensor, other: StylizeResult) -> None:
        """Put the images and losses of ``other`` into ``rows`` of this result."""
        for f in dataclasses.fields(self):
            getattr(self, f.name)[rows] = getattr(other, f.name)

    def terms(self, i: int) -> dict[str, float]:
        """Image ``i``'s initial and final terms as plain floats (for a manifest line or a quality record)."""
        names = ("content", "style", "tv", "total")
        out = {f"initial_{n}": float(getattr(self, f"initial_{n}_loss")[i]) for n in names}
        out.update({f"final_{n}": float(getattr(self, f"{n}_loss")[i]) for n in names})
        return out


def stylize(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    seeds: Sequence[int] | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> StylizeResult:
    """Neural style transfer of a batch: each image towards its content image and its style targets.

    The evaluations follow :func:`schedule`: with ``cfg.coarse_to_fine``, a share of them at half size first
    (content and style images halved; the result upsampled as the start of the full-size stage, as Gatys et
    al. 2017 do), and in bf16 the last ``cfg.fp32_finish`` share in fp32. Each stage starts a fresh optimiser.
    In bf16, an image whose loss or gradient becomes NaN/inf, or whose final loss (re-evaluated) ends more than
    2% above the lowest loss it reached, is optimised again in fp32.

    Parameters
    ----------
    features : VGGFeatures
        Extractor returning at least ``cfg.layers()``; on the device of ``content``.
    content : Tensor
        Content images (B, 3, H, W) in [0, 1].
    targets : dict of str to Tensor
        Per-image Gram targets ``{style layer: (B, C, C)}`` (see :func:`style_targets`, :func:`stack_targets`).
    cfg : NSTConfig
        Objective, optimiser, iterations and precision.
    seeds : sequence of int, optional
        One seed per image for ``init="noise"`` (default: 0, 1, ...).
    callback : callable, optional
        Called after every evaluation with the images each optimiser holds, RGB in [0, 1] (B, 3, h, w) at the
        stage's size (for loss-over-time curves; not called while images are redone in fp32).

    Returns
    -------
    StylizeResult
        Images, initial and final losses; ``finite`` is False for images that stayed NaN/inf (redo them
        elsewhere or report them), ``redone`` True for images redone in fp32.
    """
    precision = resolve_precision(cfg.precision, content.device)
    seeds = list(range(len(content))) if seeds is None else [int(s) for s in seeds]
    result, strayed = _optimise(features, content, targets, cfg, seeds, precision, callback)
    rows = (~result.finite | strayed).nonzero().flatten()
    if precision == "fp32" or not len(rows):
        return result
    logger.info(
        "%d of %d image(s) went wrong in %s; redoing them in fp32", len(rows), len(content), precision
    )
    redo, _ = _optimise(
        features,
        content[rows],
        {k: v[rows] for k, v in targets.items()},
        cfg,
        [seeds[i] for i in rows.tolist()],
        "fp32",
    )
    redo.redone[:] = True
    result.replace_rows(rows, redo)
    return result


@dataclass(frozen=True)
class Stage:
    """One stage of an optimisation: image side relative to the output, and each loss evaluation's precision."""

    scale: float
    precisions: tuple[str, ...]


def schedule(cfg: NSTConfig, precision: str, size: Sequence[int]) -> list[Stage]:
    """The stages of optimising images of ``size`` (H, W) at ``precision``, in order.

    ``cfg.coarse_to_fine`` of the evaluations at half size (none when that side is under ``MIN_COARSE_SIDE``
    pixels), then the rest (at least one) at full size; in bf16 the last ``cfg.fp32_finish`` of them in fp32.
    """
    n = cfg.iterations
    coarse = min(round(n * cfg.coarse_to_fine), n - 1)  # at least one evaluation at full size
    coarse = coarse if min(_scaled(size, COARSE_SCALE)) >= MIN_COARSE_SIDE else 0
    finish = min(round(n * cfg.fp32_finish), n - coarse) if precision == "bf16" else 0
    stages = [
        Stage(COARSE_SCALE, (precision,) * coarse),
        Stage(1.0, (precision,) * (n - coarse - finish) + ("fp32",) * finish),
    ]
    return [stage for stage in stages if stage.precisions]


def _optimise(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    seeds: list[int],
    precision: str,
    callback: Callable[[Tensor], None] | None = None,
) -> tuple[StylizeResult, Tensor]:
    """One optimisation of the batch at ``precision``; also returns which images ended >2% above their best.

    The stages of :func:`schedule` run in turn, each from the previous stage's result; the initial and final
    terms are at full size, in the last evaluation's precision.
    """
    plan = schedule(cfg, precision, content.shape[-2:])
    full = {layer: targets[layer] for layer in cfg.style_layers}
    coarse = {layer: targets.get(coarse_key(layer), targets[layer]) for layer in cfg.style_layers}
    full_start = start = initial_images(_model_input(content, cfg), cfg.init, seeds)
    finite = torch.ones(len(content), dtype=torch.bool, device=content.device)
    evaluations = torch.zeros(len(content), dtype=torch.long, device=content.device)
    end = plan[-1].precisions[-1]
    initial = x = None
    if plan[0].scale != 1.0:
        with torch.no_grad():
            target = content_features(features, content, cfg, end)
            initial = objective(features, to_space(start, cfg), target, full, cfg, end)
    for stage in plan:
        size = _scaled(content.shape[-2:], stage.scale)
        if x is not None:
            upsampled = resize(from_space(x, cfg), size)
            start = _better_start(features, content, full_start, upsampled, full, cfg, end)
        elif stage.scale != 1.0:
            start = initial_images(_model_input(resize(content, size), cfg), cfg.init, seeds)
        stage_targets = full if stage.scale == 1.0 else coarse
        run = _run_stage(
            features, resize(content, size), to_space(start, cfg), stage_targets, cfg, stage, callback
        )
        x, finite = run.x, finite & run.finite
        initial = run.first if initial is None else initial
        evaluations += run.evaluations
    with torch.no_grad():
        target = content_features(features, content, cfg, end)
        final = objective(features, x, target, full, cfg, end)
        result = from_space(x, cfg).clamp(0, 1)
    finite &= torch.isfinite(final.total)
    lowest = torch.minimum(run.lowest, final.total)
    strayed = final.total - lowest > (STRAY_TOLERANCE - 1) * lowest.abs()
    if cfg.preserve_color != "none":
        result = keep_color(result, content)
    return StylizeResult(
        result,
        final.content,
        final.style,
        final.tv,
        final.total,
        finite,
        torch.zeros_like(finite),
        initial.content,
        initial.style,
        initial.tv,
        initial.total,
        evaluations,
    ), strayed


@torch.no_grad()
def _better_start(
    features: VGGFeatures,
    content: Tensor,
    initial: Tensor,
    upsampled: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    precision: str,
) -> Tensor:
    """Per image, the upsampled coarse result, or the start image where that has the higher full-size loss.

    Upsampling loses the finest detail; on an image made of it (noise) the coarse result can be worse than
    the start, and the full-size stage then starts from the start image.
    """
    upsampled = upsampled.clamp(0, 1) if cfg.clamp else upsampled
    target = content_features(features, content, cfg, precision)
    losses = [
        objective(features, to_space(x, cfg), target, targets, cfg, precision).total
        for x in (initial, upsampled)
    ]
    keep = losses[1] <= losses[0]
    return torch.where(keep.view(-1, 1, 1, 1), upsampled, initial)


@dataclass
class _StageRun:
    """What one stage of :func:`_optimise` ended with."""

    x: Tensor  # (B, 3, h, w) the images each optimiser holds, in the objective's units
    lowest: Tensor  # (B,) the lowest loss seen
    first: Losses  # the losses at the stage's start
    finite: Tensor  # (B,) bool: loss and gradient finite at the stage's start
    evaluations: Tensor  # (B,) long: evaluations before each image stopped


def _run_stage(
    features: VGGFeatures,
    content: Tensor,
    x: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    stage: Stage,
    callback: Callable[[Tensor], None] | None,
) -> _StageRun:
    """The evaluations of ``stage`` from ``x`` (objective units) at ``x``'s size, with one optimiser."""
    content_target = {p: content_features(features, content, cfg, p) for p in set(stage.precisions)}
    x = x.detach().clone().requires_grad_(True)
    opt = make_optimizer(x, dataclasses.replace(cfg, iterations=len(stage.precisions)))
    lowest = torch.full((len(x),), float("inf"), device=x.device)
    first = finite = None
    for precision in stage.precisions:
        view = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
        losses = objective(features, view, content_target[precision], targets, cfg, precision)
        (grad,) = torch.autograd.grad(losses.total.sum(), x)
        if first is None:
            first = Losses(*(getattr(losses, f.name).detach() for f in dataclasses.fields(Losses)))
            finite = torch.isfinite(losses.total) & torch.isfinite(grad).flatten(1).all(1)
        lowest = torch.minimum(lowest, torch.nan_to_num(losses.total.detach(), nan=float("inf")))
        opt.step(x, losses.total.detach(), grad, finite)
        if callback is not None:
            with torch.no_grad():
                callback(from_space(opt.best.reshape(x.shape), cfg).clamp(0, 1))
    return _StageRun(opt.best.reshape(x.shape).detach(), lowest, first, finite, opt.evaluations.clone())
