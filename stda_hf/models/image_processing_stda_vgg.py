"""The image processor of the project's classifiers: the evaluation transform, as ``AutoImageProcessor`` loads it.

Resize to ``size["height"]`` x ``size["width"]`` in the resize mode the model was trained with (``resize_mode``:
``crop``, ``pad`` or ``squash``; PIL bilinear, as torchvision resizes PIL images), scale to [0, 1], normalise with
``image_mean`` and ``image_std``: the same operations in the same order and dtype as
``stda_hf.models.vgg.eval_transform``, so a model gives the same logits through ``pipeline`` as in
``train.py``'s evaluation. Saved beside every trained model (``register_for_auto_class``); it imports only
``numpy``, ``PIL``, ``torch`` and ``transformers``, so the geometry of ``stda_hf.data.images.fit_image`` is
repeated here (the tests hold the two to the same pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("crop", "pad", "squash")
PAD_FILL = (124, 116, 104)  # the ImageNet mean colour: (almost) zero after normalisation


class StdaImageProcessor(BaseImageProcessor):
    """Resize, scale and normalise RGB images into ``pixel_values`` ``(N, 3, height, width)`` float32.

    Parameters
    ----------
    size : int or dict
        Side of the square the images are resized to, or ``{"height": h, "width": w}``. Stored (and saved in
        ``preprocessor_config.json``) as the dict, the form ``transformers`` image processors and its example
        scripts read (``"shortest_edge" in image_processor.size``).
    image_mean, image_std : sequence of 3 float
        Per-channel normalisation after scaling to [0, 1].
    resize_mode : str
        ``crop`` (aspect kept, shorter side to the size, centre kept), ``pad`` (aspect kept, longer side to the
        size, centred on the ImageNet mean colour) or ``squash`` (stretched to the size). The default is
        ``squash`` so that a ``preprocessor_config.json`` saved before the key existed loads as its model was
        trained; train.py always saves the key.
    """

    model_input_names = ["pixel_values"]  # noqa: RUF012 - transformers reads this class attribute

    def __init__(
        self,
        size: int = 224,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        resize_mode: str = "squash",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"resize_mode {resize_mode!r} is not a resize mode; choose one of {list(RESIZE_MODES)}"
            )
        self.resize_mode = resize_mode
        height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size, size)
        self.size = {"height": int(height), "width": int(width)}
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """``pixel_values`` of one image or a list (PIL images or ``(H, W, 3)`` uint8 arrays)."""
        batch = images if isinstance(images, (list, tuple)) else [images]
        pixels = torch.stack([self.transform(image) for image in batch])
        if return_tensors in ("np", "numpy"):
            pixels = pixels.numpy()
        return BatchFeature(data={"pixel_values": pixels})

    def transform(self, image) -> torch.Tensor:
        """One image as a normalised ``(3, height, width)`` float32 tensor."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = fit(image, (self.size["width"], self.size["height"]), self.resize_mode)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        x = x.to(torch.float32).mul_(1.0 / 255)
        mean = torch.as_tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)
        return x.sub(mean).div_(std)


def fit(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """``image`` (RGB) resized to ``size`` ``(width, height)`` in resize mode ``mode``, PIL bilinear, in one step."""
    width, height = size
    w, h = image.size
    if mode == "squash":
        return image.resize((width, height), Image.BILINEAR)
    if mode == "crop":  # the largest centred box of the target's aspect
        if w * height > h * width:
            cw = h * width / height
            box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
        else:
            ch = w * height / width
            box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
        return image.resize((width, height), Image.BILINEAR, box=box)
    scale = min(width / w, height / h)
    inner = (max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale))))
    canvas = Image.new("RGB", (width, height), PAD_FILL)
    canvas.paste(image.resize(inner, Image.BILINEAR), ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas
