"""Every network the project builds, in one place: classifiers, teacher backbones, the style-transfer features.

Weights come from torchvision (downloaded when online), from a local file, or are random when the user asks
for ``random`` (tests and the offline demo); :func:`~stda_hf.models.weights.load_weights` is the one place
that decides.
"""

from .features import build_vgg_features
from .vgg import (
    MODEL_NAMES,
    VGG8,
    Preprocessing,
    TorchvisionVGG,
    build_model,
    load_model,
    save_model,
)
from .weights import WeightsSpec, load_weights, parse_weights

__all__ = [
    "MODEL_NAMES",
    "VGG8",
    "Preprocessing",
    "TorchvisionVGG",
    "WeightsSpec",
    "build_model",
    "build_vgg_features",
    "load_model",
    "load_weights",
    "parse_weights",
    "save_model",
]
