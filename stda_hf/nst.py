"""The style-transfer engine: Gram matrices, content/style/TV losses and batched, per-image-independent optimisation.

Pure tensor code (no files): :func:`style_targets` turns style images into Gram targets once, and
:func:`stylize` optimises a batch of images, each towards its own content image and style targets. Every image
has its own optimiser state (the batched L-BFGS keeps per-image curvature pairs, step sizes and stopping), so an
image's result does not depend on which other images share its batch::

    features = build_vgg_features("vgg19", cfg.layers(), weights="random")
    targets = style_targets(features, style_images, cfg)           # {layer: (B, C, C)}
    result = stylize(features, content_images, targets, cfg, seeds=[0, 1])
    result.images                                                  # (B, 3, H, W) in [0, 1]

Loss conventions (those of the PyTorch tutorial and Johnson's neural-style, so that weights do not depend on
the image size): content loss is the mean squared difference of the content-layer activations; a Gram matrix
is ``F F^T / (C H W)`` of the (optionally shifted) activations, computed in fp32; a layer's style loss is the
mean squared difference of Gram matrices, and the style loss the weighted sum over layers; total variation is
the mean of squared neighbour differences of the image in [0, 1].
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import StdaError
from .models.features import POOLINGS, VGGFeatures, conv_layer_names

logger = logging.getLogger(__name__)

OPTIMIZERS = ("lbfgs", "adam")
INITS = ("content", "noise", "gray")
PRECISIONS = ("auto", "fp32", "bf16")
COLOR_MODES = ("none", "luminance", "ycbcr")
LAYER_WEIGHTINGS = ("uniform", "geometric")
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}
STRAY_TOLERANCE = 1.02
"""A bf16 image whose final loss exceeds this times the lowest loss it reached is redone in fp32."""

PRESETS: dict[str, dict] = {
    # Gatys et al. (2016) layers on VGG19, with the PyTorch tutorial's weights for these loss conventions.
    "default": {
        "arch": "vgg19",
        "content_layer": "conv4_2",
        "style_layers": ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"),
        "layer_weights": "uniform",
        "content_weight": 1.0,
        "style_weight": 1e6,
        "tv_weight": 0.0,
        "gram_shift": 0.0,
        "pooling": "max",
        "init": "content",
    },
    # The original work's Keras settings, with the Novak & Nikulin improvements it used: every convolution
    # as a style layer, geometric layer weights and activations shifted by -1 in the Gram matrix.
    "original": {
        "arch": "vgg16",
        "content_layer": "conv5_2",
        "style_layers": ("all",),
        "layer_weights": "geometric",
        "content_weight": 0.025,
        "style_weight": 1.0,
        "tv_weight": 8.5e-5,
        "gram_shift": -1.0,
        "pooling": "max",
        "init": "content",
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
    style_scale: float = 1.0  # side of the style image relative to the output side
    preserve_color: str = "none"  # none, luminance (transfer luminance only) or ycbcr (keep content's Cb/Cr)
    optimizer: str = "lbfgs"  # lbfgs (per-image history, no line search) or adam
    lr: float | None = None  # step size (unset: 1.0 for lbfgs, 0.02 for adam)
    iterations: int = 100  # optimiser evaluations (forward+backward passes) per image
    history: int = 100  # L-BFGS curvature pairs kept per image
    clamp: bool = True  # clamp pixels to [0, 1] after every step, as the PyTorch tutorial does
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16 autocast (Grams always fp32)

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


# ----------------------------------------------------------------------------------------------------------------
# Losses (per image: every function returns a (B,) tensor)


def gram(features: Tensor, shift: float = 0.0) -> Tensor:
    """Gram matrices ``(F + shift)(F + shift)^T / (C H W)`` of activations (B, C, H, W), in fp32: (B, C, C)."""
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        f = _at_least_fp32(features).reshape(b, c, h * w)
        if shift:
            f = f + shift
        return torch.baddbmm(f.new_empty(b, c, c), f, f.transpose(1, 2), beta=0.0, alpha=1.0 / (c * h * w))


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


@dataclass
class Losses:
    """Per-image losses (each (B,)): unweighted terms and the weighted total that is optimised."""

    content: Tensor
    style: Tensor
    tv: Tensor
    total: Tensor


def objective(
    features: VGGFeatures,
    images: Tensor,
    content_target: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    precision: str = "fp32",
) -> Losses:
    """Content, style and TV losses of ``images`` (B, 3, H, W) against per-image targets."""
    with _autocast(precision, images.device):
        acts = features(images)
    layer_weights = cfg.style_layer_weights()
    grams = {layer: gram(acts[layer], cfg.gram_shift) for layer in layer_weights}
    c = content_loss(acts[cfg.content_layer], content_target)
    s = style_loss(grams, targets, layer_weights)
    tv = tv_loss(_at_least_fp32(images)) if cfg.tv_weight else torch.zeros_like(c)
    total = cfg.content_weight * c + cfg.style_weight * s + cfg.tv_weight * tv
    return Losses(content=c, style=s, tv=tv, total=total)


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
    """Gram targets of style images (B, 3, h, w) in [0, 1], computed in fp32: ``{layer: (B, C, C)}``."""
    acts = features(_model_input(styles, cfg))
    return {layer: gram(acts[layer], cfg.gram_shift) for layer in cfg.style_layers}


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
    """L-BFGS over a batch where every image has its own history, curvature pairs, step and stopping.

    The update of each image is that of ``torch.optim.LBFGS`` with its defaults (no line search, step
    ``min(1, 1/|g|_1) * lr`` on the first iteration, then ``lr``), vectorised over the batch with a two-loop
    recursion. An image stops (keeps its pixels) when its gradient vanishes, its direction is no longer a descent
    direction, or its loss or gradient is not finite. The history is a ring of the last ``history`` iterations'
    pairs; a pair an image rejects (``y.s <= 1e-10``) leaves a gap, so it equals torch's history whenever no pair
    is rejected or there are at most ``history`` iterations.

    Parameters
    ----------
    x : Tensor
        The images being optimised (B, ...), fp32; updated in place by :meth:`step`.
    lr : float
        Step size.
    history : int
        Curvature pairs kept per image.
    """

    def __init__(
        self,
        x: Tensor,
        lr: float = 1.0,
        history: int = 100,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
    ):
        b, n = x.shape[0], x[0].numel()
        self.lr, self.m = lr, history
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        self.s = x.new_zeros(b, history, n)  # steps, one ring per image
        self.y = x.new_zeros(b, history, n)  # gradient differences
        self.rho = x.new_zeros(b, history)  # 1 / (y.s); 0 marks an empty or rejected slot
        self.h_diag = x.new_ones(b)
        self.active = torch.ones(b, dtype=torch.bool, device=x.device)
        self.ptr, self.stored = 0, 0
        self.d: Tensor | None = None
        self.t: Tensor | None = None
        self.prev_grad: Tensor | None = None

    @torch.no_grad()
    def step(self, x: Tensor, grad: Tensor, finite: Tensor) -> None:
        """Move each active image of ``x`` along its L-BFGS direction, given its gradient (B, ...)."""
        b = x.shape[0]
        self.active &= finite
        g = torch.where(self.active[:, None], grad.reshape(b, -1).to(x.dtype), 0.0)
        self.active &= g.abs().amax(1) > self.tolerance_grad
        if self.d is None:
            d = -g
            t = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * self.lr
        else:
            self._remember(g)
            d = self._direction(g)
            t = torch.full_like(self.h_diag, self.lr)
        self.active &= torch.linalg.vecdot(g, d) <= -self.tolerance_change
        d = torch.where(self.active[:, None], d, 0.0)
        self.prev_grad, self.d, self.t = g, d, t
        x.view(b, -1).add_(d * t[:, None])

    def _remember(self, g: Tensor) -> None:
        """Store this iteration's curvature pair (s, y) in the ring; images that reject it store zeros."""
        y = g - self.prev_grad
        s = self.d * self.t[:, None]
        ys = torch.linalg.vecdot(y, s)
        accept = (ys > 1e-10) & self.active
        self.s[:, self.ptr] = torch.where(accept[:, None], s, 0.0)
        self.y[:, self.ptr] = torch.where(accept[:, None], y, 0.0)
        self.rho[:, self.ptr] = torch.where(accept, 1.0 / ys, 0.0)
        yy = torch.linalg.vecdot(y, y)
        self.h_diag = torch.where(accept, ys / torch.where(accept, yy, 1.0), self.h_diag)
        self.ptr = (self.ptr + 1) % self.m
        self.stored = min(self.stored + 1, self.m)

    def _direction(self, g: Tensor) -> Tensor:
        """Two-loop recursion, newest pair first, for every image at once: ``-H g``."""
        slots = [(self.ptr - 1 - j) % self.m for j in range(self.stored)]
        q = -g
        alphas = []
        for i in slots:
            a = self.rho[:, i] * torch.linalg.vecdot(self.s[:, i], q)
            q.addcmul_(self.y[:, i], a[:, None], value=-1.0)
            alphas.append(a)
        r = q.mul_(self.h_diag[:, None])
        for i, a in zip(reversed(slots), reversed(alphas), strict=True):
            beta = self.rho[:, i] * torch.linalg.vecdot(self.y[:, i], r)
            r.addcmul_(self.s[:, i], (a - beta)[:, None])
        return r


class BatchedAdam:
    """Adam on a batch of images (elementwise, hence per image); non-finite images stop moving."""

    def __init__(self, x: Tensor, lr: float = 0.02):
        self.opt = torch.optim.Adam([x], lr=lr)
        self.active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    @torch.no_grad()
    def step(self, x: Tensor, grad: Tensor, finite: Tensor) -> None:
        """One Adam step with ``grad``; images that went non-finite get a zero gradient from now on."""
        self.active &= finite
        x.grad = torch.where(self.active.view(-1, *[1] * (grad.dim() - 1)), grad, 0.0)
        self.opt.step()
        x.grad = None


def make_optimizer(x: Tensor, cfg: NSTConfig) -> BatchedLBFGS | BatchedAdam:
    """The per-image optimiser ``cfg.optimizer`` for images ``x``."""
    if cfg.optimizer == "adam":
        return BatchedAdam(x, lr=cfg.lr)
    return BatchedLBFGS(x, lr=cfg.lr, history=min(cfg.history, max(cfg.iterations - 1, 1)))


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
    """Output of :func:`stylize`: images and the final per-image losses (unweighted terms and weighted total)."""

    images: Tensor  # (B, 3, H, W) in [0, 1]
    content_loss: Tensor  # (B,)
    style_loss: Tensor  # (B,)
    tv_loss: Tensor  # (B,)
    total_loss: Tensor  # (B,)
    finite: Tensor  # (B,) bool: False where a loss or gradient became NaN/inf (in fp32 too)
    redone: Tensor  # (B,) bool: True where the bf16 run went wrong and the image was redone in fp32

    def replace_rows(self, rows: Tensor, other: StylizeResult) -> None:
        """Put the images and losses of ``other`` into ``rows`` of this result."""
        for f in dataclasses.fields(self):
            getattr(self, f.name)[rows] = getattr(other, f.name)


def stylize(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    seeds: Sequence[int] | None = None,
) -> StylizeResult:
    """Neural style transfer of a batch: each image towards its content image and its style targets.

    In bf16, an image whose loss or gradient becomes NaN/inf, or whose final loss ends more than 2% above the
    lowest loss it reached (L-BFGS thrown off course by bf16 rounding in its curvature pairs), is optimised
    again in fp32.

    Parameters
    ----------
    features : VGGFeatures
        Extractor returning at least ``cfg.layers()``; on the device of ``content``.
    content : Tensor
        Content images (B, 3, H, W) in [0, 1].
    targets : dict of str to Tensor
        Per-image Gram targets ``{style layer: (B, C, C)}`` (see :func:`style_targets`, :func:`stack_targets`).
    cfg : NSTConfig
        Losses, optimiser, iterations and precision.
    seeds : sequence of int, optional
        One seed per image for ``init="noise"`` (default: 0, 1, ...).

    Returns
    -------
    StylizeResult
        Images and final losses; ``finite`` is False for images that stayed NaN/inf (redo them elsewhere or
        report them), ``redone`` True for images redone in fp32.
    """
    precision = resolve_precision(cfg.precision, content.device)
    seeds = list(range(len(content))) if seeds is None else [int(s) for s in seeds]
    result, strayed = _optimise(features, content, targets, cfg, seeds, precision)
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


def _optimise(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    cfg: NSTConfig,
    seeds: list[int],
    precision: str,
) -> tuple[StylizeResult, Tensor]:
    """One optimisation of the batch at ``precision``; also returns which images ended >2% above their best."""
    model_in = _model_input(content, cfg)
    with torch.no_grad(), _autocast(precision, content.device):
        content_target = _at_least_fp32(features(model_in)[cfg.content_layer])
    x = initial_images(model_in, cfg.init, seeds).requires_grad_(True)
    opt = make_optimizer(x, cfg)
    finite = torch.ones(len(x), dtype=torch.bool, device=x.device)
    best = torch.full((len(x),), float("inf"), device=x.device)
    for _ in range(cfg.iterations):
        total = objective(features, x, content_target, targets, cfg, precision).total
        (grad,) = torch.autograd.grad(total.sum(), x)
        finite &= torch.isfinite(total) & torch.isfinite(grad).flatten(1).all(1)
        best = torch.minimum(best, total.detach())
        opt.step(x, grad, finite)
        if cfg.clamp:
            with torch.no_grad():
                x.clamp_(0, 1)
    result = x.detach().clamp(0, 1)
    with torch.no_grad():
        final = objective(features, result, content_target, targets, cfg, precision)
    finite &= torch.isfinite(final.total)
    strayed = final.total > STRAY_TOLERANCE * torch.minimum(best, final.total)
    if cfg.preserve_color != "none":
        result = keep_color(result, content)
    redone = torch.zeros_like(finite)
    return StylizeResult(result, final.content, final.style, final.tv, final.total, finite, redone), strayed
