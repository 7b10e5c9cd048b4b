"""The ``transformers`` configuration of the project's VGG classifiers (VGG8 and torchvision's VGG11/VGG16).

This file is saved beside every trained model (``register_for_auto_class``), so that
``AutoConfig.from_pretrained(..., trust_remote_code=True)`` reads it without ``stda_hf`` installed: it imports
nothing but ``transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig

VGG_ARCHS = ("vgg8", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn")
"""Architectures this configuration describes: our VGG8 and torchvision's VGGs (same parameter names)."""
DEFAULT_LABELS = ("benign", "malignant")


class StdaVGGConfig(PretrainedConfig):
    """Layers of a VGG classifier; class names in ``id2label`` (default: 0 benign, 1 malignant).

    Parameters
    ----------
    arch : {"vgg8", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn"}
        ``vgg8``: five 3x3 convolutions (``widths``) then three linear layers (``hidden``); the others:
        torchvision's layouts (4096-unit classifier after a 7x7 pooling; ``widths``, ``hidden``, ``pool_size``
        and ``batch_norm`` follow the name).
    widths : sequence of 5 int
        VGG8: channels of the five convolutions.
    hidden : sequence of 2 int
        VGG8: units of the first two linear layers.
    batch_norm : bool
        VGG8: batch normalisation after each convolution.
    dropout : float
        Dropout after the first two linear layers.
    pool_size : int
        VGG8: side of the adaptive average pooling before the classifier.
    in_channels : int
        Input channels (3 for RGB).
    **kwargs
        ``PretrainedConfig`` settings (``id2label``, ``label2id``, ``num_labels``, ...).
    """

    model_type = "stda-vgg"

    def __init__(
        self,
        arch: str = "vgg8",
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        hidden: Sequence[int] = (512, 512),
        batch_norm: bool = True,
        dropout: float = 0.5,
        pool_size: int = 2,
        in_channels: int = 3,
        **kwargs,
    ):
        if arch not in VGG_ARCHS:
            raise ValueError(f"unknown VGG architecture {arch!r}; valid: {list(VGG_ARCHS)}")
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(enumerate(DEFAULT_LABELS))
        if "id2label" in kwargs and "label2id" not in kwargs:
            kwargs["label2id"] = {name: int(i) for i, name in kwargs["id2label"].items()}
        self.arch = arch
        if arch != "vgg8":  # torchvision's fixed layout
            widths, hidden, pool_size, batch_norm = (
                (64, 128, 256, 512, 512),
                (4096, 4096),
                7,
                arch.endswith("_bn"),
            )
        self.widths = [int(w) for w in widths]
        self.hidden = [int(h) for h in hidden]
        self.batch_norm = bool(batch_norm)
        self.dropout = float(dropout)
        self.pool_size = int(pool_size)
        self.in_channels = int(in_channels)
        super().__init__(**kwargs)
