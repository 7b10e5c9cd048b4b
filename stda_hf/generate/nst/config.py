"""The style-transfer engine's settings: the presets, :class:`NSTConfig` with its checks, and the style-layer weights.

Two presets: ``default`` (Gatys et al. 2016 on VGG19 with the PyTorch tutorial's loss conventions) and
``original`` (titu1994's ``INetwork.py``, which the original work ran). Settings left unset come from the
preset; :meth:`NSTConfig.__post_init__` refuses a bad value with an error naming it and the valid ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stda_hf.core.errors import StdaError
from stda_hf.models.features import POOLINGS, conv_layer_names

OPTIMIZERS = ("lbfgs", "adam")
OBJECTIVES = ("gatys", "inetwork")
INITS = ("content", "noise", "gray")
PRECISIONS = ("auto", "fp32", "bf16")
COLOR_MODES = ("none", "luminance", "ycbcr")
LAYER_WEIGHTINGS = ("uniform", "geometric", "inetwork")
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}
COARSE_SCALE = 0.5
"""Side of the coarse stage's images relative to the output (``coarse_to_fine``)."""

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


SPACE_PRESETS: dict[tuple[str, str], dict] = {
    # Caffe-convention weights (vgg19-imagenet, Keras .h5) see 0-255 pixels: their activations are ~60x those of
    # torchvision-convention networks, so Gram terms grow ~1e7x and content terms ~3600x. Unweighted, style and
    # content terms of a phantom pair are then of one order (style loss of the content image / content loss of
    # the style image: 1.6-8.4 on vgg19-imagenet, 2e-5 on random weights), and 1e6 would wipe the content.
    # Tuned on vgg19-imagenet, 3 phantom pairs at 96 px, 50 evaluations (docs/generate.md): style weights 1e3, 1e2,
    # 30 and 3 all cut the style loss to 0.2-5% and left the same image: the style's dots and network in lesion
    # and skin, and small dark blobs (hallucinated lesions) in the skin of one pair; 0.3 kept the lesion outline
    # sharpest, no blobs, but transferred visibly less texture (style loss to 4-16%). 1 lies between.
    ("default", "caffe"): {"style_weight": 1.0},
}
"""Preset values that depend on the input convention of the weights (``(preset, input space)``: values); they
replace the preset's own where the setting is left unset (:func:`preset_settings`)."""


def preset_settings(preset: str, input_space: str = "torchvision") -> dict:
    """The settings of ``preset`` for weights of ``input_space`` (``caffe`` or ``torchvision``)."""
    if preset not in PRESETS:
        raise StdaError(f"unknown --preset {preset!r}; valid presets: {sorted(PRESETS)}")
    return {**PRESETS[preset], **SPACE_PRESETS.get((preset, input_space), {})}


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
        for key, value in preset_settings(self.preset, self.weights_space()).items():
            if getattr(self, key) in (None, ()):
                setattr(self, key, value)
        self.style_layers = tuple(self.style_layers)
        if self.style_layers == ("all",):
            self.style_layers = tuple(conv_layer_names(self.arch))
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.optimizer)
        _validate(self)

    def weights_space(self) -> str:
        """The input convention of the weights these settings are for (torchvision's; ``stda generate``'s settings
        know their ``--weights``)."""
        return "torchvision"

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
    if not cfg.lr > 0:
        raise StdaError(f"--lr {cfg.lr} must be positive")


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
