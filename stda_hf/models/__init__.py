"""Every network the project builds, in one place: classifiers, teacher backbones, the style-transfer features.

Weights come from torchvision (downloaded when online), from a local file, or are random when the user asks
for ``random`` (tests and the offline demo); :func:`~stda_hf.models.weights.load_weights` is the one place
that decides.
"""

from .weights import WeightsSpec, load_weights, parse_weights

__all__ = ["WeightsSpec", "load_weights", "parse_weights"]
