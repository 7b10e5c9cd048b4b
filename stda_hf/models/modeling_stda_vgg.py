"""The ``transformers`` model of the project's VGG classifiers: VGG8 and torchvision's VGG11/VGG16 layouts.

Saved beside every trained model (``register_for_auto_class``) so that ``pipeline("image-classification",
model=..., trust_remote_code=True)`` runs without ``stda_hf`` installed: it imports only ``torch``,
``transformers`` and its configuration file. Parameter names are torchvision's (``features.<i>``,
``classifier.<i>``), so torchvision ImageNet weights load unchanged, and ``forward`` calls only plain ``nn``
modules in order (Conv2d, BatchNorm2d, ReLU, MaxPool2d, AdaptiveAvgPool2d, Flatten, Linear, Dropout), so
Zennit's canonizers and rules apply.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_stda_vgg import StdaVGGConfig  # relative: this file travels as Hub remote code

TORCHVISION_LAYOUTS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
"""torchvision's convolution plans ("M": 2x2 max pooling), by architecture without ``_bn``."""


def conv_plan(config: StdaVGGConfig) -> tuple[tuple[int | str, ...], bool]:
    """The convolution plan of ``config`` and whether its pooling rounds up (VGG8 does, for any input size)."""
    if config.arch == "vgg8":
        return tuple(x for w in config.widths for x in (w, "M")), True
    return TORCHVISION_LAYOUTS[config.arch.removesuffix("_bn")], False


def build_features(config: StdaVGGConfig) -> nn.Sequential:
    """Conv2d(3x3, padding 1) [- BatchNorm2d] - ReLU per entry of the plan; MaxPool2d(2) per "M"."""
    plan, ceil = conv_plan(config)
    layers: list[nn.Module] = []
    channels = config.in_channels
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil))
            continue
        layers.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1))
        layers += [nn.BatchNorm2d(int(item))] if config.batch_norm else []
        layers.append(nn.ReLU(inplace=True))
        channels = int(item)
    return nn.Sequential(*layers)


def build_classifier(config: StdaVGGConfig) -> nn.Sequential:
    """Linear - ReLU - Dropout, twice, then the ``num_labels`` head."""
    flat = config.widths[-1] * config.pool_size * config.pool_size
    first, second = config.hidden
    return nn.Sequential(
        nn.Linear(flat, first),
        nn.ReLU(inplace=True),
        nn.Dropout(config.dropout),
        nn.Linear(first, second),
        nn.ReLU(inplace=True),
        nn.Dropout(config.dropout),
        nn.Linear(second, config.num_labels),
    )


class StdaVGGForImageClassification(PreTrainedModel):
    """A VGG image classifier; ``forward`` returns an ``ImageClassifierOutput`` (logits, and the loss with labels)."""

    config_class = StdaVGGConfig
    base_model_prefix = "stda_vgg"
    main_input_name = "pixel_values"

    def __init__(self, config: StdaVGGConfig):
        super().__init__(config)
        self.features = build_features(config)
        self.avgpool = nn.AdaptiveAvgPool2d(config.pool_size)
        self.flatten = nn.Flatten(1)
        self.classifier = build_classifier(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation of a layer (``reset_parameters``), as the layer's constructor drew it.

        ``transformers`` calls this for every layer a checkpoint does not fill: a new head when loading with
        ``num_labels`` other than the checkpoint's (``ignore_mismatched_sizes=True``), which ``transformers`` 5
        creates empty. Parameters loaded from the checkpoint are left alone (its init guard).
        """
        if module is not self and hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """Logits ``(N, num_labels)`` of normalised images ``(N, 3, H, W)``; cross-entropy loss given ``labels``."""
        logits = self.classifier(self.flatten(self.avgpool(self.features(pixel_values))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutput(loss=loss, logits=logits)
