"""Every network the project builds, in one place: classifiers, teacher backbones, the style-transfer features.

Weights come from torchvision (downloaded when online), from a local file, or are random when the user asks
for ``random`` (tests and the offline demo); :func:`~stda_hf.models.weights.load_weights` is the one place
that decides. Importing this package registers the ``stda-vgg`` model type with the ``transformers`` Auto
classes (:func:`~stda_hf.models.vgg.register_auto_classes`).
"""

from stda_hf.models.features import build_vgg_features
from stda_hf.models.vgg import (
    MODEL_NAMES,
    VGG8,
    Preprocessing,
    StdaImageProcessor,
    StdaVGGConfig,
    StdaVGGForImageClassification,
    TorchvisionVGG,
    build_model,
    image_processor,
    load_model,
    register_auto_classes,
    save_model,
)
from stda_hf.models.weights import WeightsSpec, load_weights, parse_weights

register_auto_classes()

__all__ = [
    "MODEL_NAMES",
    "VGG8",
    "Preprocessing",
    "StdaImageProcessor",
    "StdaVGGConfig",
    "StdaVGGForImageClassification",
    "TorchvisionVGG",
    "WeightsSpec",
    "build_model",
    "build_vgg_features",
    "image_processor",
    "load_model",
    "load_weights",
    "parse_weights",
    "register_auto_classes",
    "save_model",
]
