"""Safe image loading: one function every stage uses to turn a file into an RGB image, or a clear refusal.

Also the one geometry every stage shares (:func:`fit_image`, :func:`fit_mask`: how an image of any aspect ratio
becomes the square a network takes, in the resize modes of :data:`RESIZE_MODES`), the side bound of packaging
(:func:`bound_side`), and the skip report that lets a batch job survive bad files and say, at the end, which ones
it skipped.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.fileio import atomic_write, write_json

logger = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000
"""Largest image accepted (width x height). Dermoscopy images reach ~40 MP; anything far larger is refused as
a likely decompression bomb. Raise it per call with ``max_pixels`` when you really have such images."""

RESIZE_MODES = ("crop", "pad", "squash")
"""How an image becomes a ``size`` x ``size`` square (``--resize`` of generate, train and label):

- ``crop`` (the default): aspect kept; the shorter side is resized to ``size`` and the centre of the longer one
  kept (what torchvision's ``Resize(size)`` + ``CenterCrop(size)`` do, in one resampling step). A round lesion
  stays round; the frame's edges beyond the central square are lost.
- ``pad``: aspect kept; the longer side is resized to ``size`` and the image centred on a square of
  :data:`PAD_FILL`. The whole frame is kept, at fewer pixels per lesion.
- ``squash``: both sides resized to ``size`` (what every stage did before the choice existed): the whole frame,
  stretched; a 3:2 image's round lesion becomes an ellipse.

A square image gives the same pixels in every mode."""
DEFAULT_RESIZE = "crop"
PAD_FILL = (124, 116, 104)
"""The ``pad`` fill: the ImageNet mean colour, ``round(255 * (0.485, 0.456, 0.406))``. Normalised with the ImageNet
mean it is (almost) zero, the input a VGG reads as "no signal", both for the classifiers and for the style-transfer
networks (Caffe's mean is the same colour). Black would look like a dermoscope's dark corners, a known shortcut of
ISIC images (and an artifact class of the phantoms), and white like a bright frame."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""The formats the project writes and suggests; a real-image folder may hold any format Pillow reads
(:func:`why_not_an_image`)."""


def check_side(flag: str, side: int, low: int, high: int, what: str, why: str, bytes_per_pixel: int) -> None:
    """Refuse a square image side outside ``[low, high]`` before anything is allocated, saying what it would take.

    Parameters
    ----------
    flag : str
        The setting as the user typed it, e.g. ``--size``.
    side : int
        The requested side in pixels.
    low, high : int
        The sides accepted.
    what : str
        What is made at that side, e.g. ``phantoms``.
    why : str
        What holds memory in proportion to ``side ** 2``, e.g. ``each is rendered in memory as float arrays``.
    bytes_per_pixel : int
        Bytes of one such array per pixel (the GiB in the message).

    Raises
    ------
    StdaError
        ``side`` outside ``[low, high]``.
    """
    if not low <= side <= high:
        raise StdaError(
            f"{flag} {side}: {what} need {low} to {high} pixels a side ({why}: {side} px would need about "
            f"{bytes_per_pixel * side**2 / 2**30:,.1f} GiB per array)"
        )


def check_resize(mode: str, flag: str = "--resize") -> str:
    """Return ``mode`` when it is one of :data:`RESIZE_MODES`.

    Raises
    ------
    StdaError
        Naming the value and the valid modes.
    """
    if mode not in RESIZE_MODES:
        raise StdaError(f"{flag} {mode!r} is not a resize mode; choose one of {list(RESIZE_MODES)}")
    return mode


def _target(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of a ``size`` given as a square side or as ``(width, height)``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def fit_image(
    img: Image.Image,
    size: int | tuple[int, int],
    mode: str = DEFAULT_RESIZE,
    resample: int = Image.Resampling.BILINEAR,
    fill: int | tuple[int, ...] | None = None,
) -> Image.Image:
    """``img`` resized to ``size`` in resize mode ``mode`` (see :data:`RESIZE_MODES`): one resampling step.

    Parameters
    ----------
    img : PIL.Image.Image
        Any image (RGB, or a mask in mode ``L``).
    size : int or (int, int)
        The side of the square, or ``(width, height)``.
    mode : str
        ``crop``, ``pad`` or ``squash``.
    resample : int
        PIL filter (each stage keeps its own: bicubic for style transfer, bilinear for the classifiers).
    fill : int or tuple, optional
        ``pad``'s fill; default :data:`PAD_FILL` for RGB images, 0 for others.

    Returns
    -------
    PIL.Image.Image
        An image of exactly ``size``, in ``img``'s mode. ``squash`` is ``img.resize(size, resample)`` bit for bit,
        and a square ``img`` gives that in every mode.

    Raises
    ------
    StdaError
        An unknown ``mode``.
    """
    check_resize(mode)
    width, height = _target(size)
    w, h = img.size
    if mode == "squash":
        return img.resize((width, height), resample)
    if mode == "crop":
        # The largest centred box of the target's aspect, resized in one step (sub-pixel centred).
        if w * height > h * width:  # wider than the target: crop the sides
            cw = h * width / height
            box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
        else:
            ch = w * height / width
            box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
        return img.resize((width, height), resample, box=box)
    scale = min(width / w, height / h)
    inner = (max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale))))
    if fill is None:
        fill = PAD_FILL if img.mode == "RGB" else 0
    canvas = Image.new(img.mode, (width, height), fill)
    canvas.paste(img.resize(inner, resample), ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas


def fit_mask(mask: Image.Image, size: int | tuple[int, int], mode: str = DEFAULT_RESIZE) -> Image.Image:
    """A mask (or label map) in the geometry :func:`fit_image` gives its image: nearest neighbour, padded with 0.

    Any mode is read as 8-bit grey (``L``), so label values survive; the result is aligned pixel for pixel with
    ``fit_image(image, size, mode)`` of an image of the mask's size.
    """
    return fit_image(mask.convert("L"), size, mode, Image.Resampling.NEAREST, fill=0)


@dataclass(frozen=True)
class Fit:
    """:func:`fit_image` as a picklable transform (a step of a torchvision ``Compose``, data-loader workers)."""

    size: int  # side of the square
    mode: str = DEFAULT_RESIZE  # crop, pad or squash
    resample: int = Image.Resampling.BILINEAR  # PIL filter (bilinear: what torchvision's Resize uses on PIL)

    def __call__(self, img: Image.Image) -> Image.Image:
        return fit_image(img, self.size, self.mode, self.resample)


def bound_side(img: Image.Image, max_side: int, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """``img`` with its longer side at most ``max_side`` (aspect kept, never enlarged); ``img`` itself when it fits.

    The shorter side is rounded to the nearest pixel (at least 1). Masks use ``Image.Resampling.NEAREST``.
    """
    if max(img.size) <= max_side:
        return img
    return img.resize(bounded_size(*img.size, max_side), resample)


def bounded_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled so the longer side is ``max_side``, aspect kept, each side rounded (at least 1)."""
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def why_not_an_image(path: str | Path) -> str | None:
    """None when ``path`` is an image file Pillow can read, else why it is not, in words for a report.

    An extension of :data:`IMAGE_EXTENSIONS` is trusted (the full decode happens when the image is used); any
    other file (``.gif``, ``.jfif``, no extension) is accepted when Pillow recognises its header as a format it
    can decode.
    """
    path = Path(path)
    if path.is_dir():
        return "a folder (images must sit directly in the folder above it)"
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if isinstance(img, ImageFile.StubImageFile):
                    return f"a {img.format} file, which Pillow cannot decode"
                return None
    except Image.DecompressionBombError:
        return None  # an image; load_image refuses it with the reason when it is used
    except (OSError, SyntaxError, ValueError):
        return "not an image file Pillow can read"


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as an upright 8-bit RGB image, fully decoded.

    Applies the EXIF orientation, converts any mode (L, LA, P, RGBA, CMYK, I;16, F, ...) to RGB (transparent
    areas onto white), and refuses what is not a usable image.

    Parameters
    ----------
    path : str or Path
        The image file.
    max_pixels : int
        Refuse images with more pixels than this (decompression-bomb guard).

    Returns
    -------
    PIL.Image.Image
        A loaded RGB image (no open file handle behind it).

    Raises
    ------
    BadImageError
        Missing, empty, not an image, truncated, or too large; the message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(path, "file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise BadImageError(
                        path,
                        f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels} (decompression bomb?)",
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(path, f"refused as a decompression bomb ({err})") from err
    except UnidentifiedImageError as err:
        raise BadImageError(path, "not an image file Pillow can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(path, f"truncated or corrupt image data ({err})") from err


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB (alpha composited onto white, 16-bit rescaled)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def save_image(img: Image.Image, path: str | Path, quality: int = 95) -> None:
    """Save ``img`` atomically; the format follows the extension (JPEG gets ``quality``, PNG is lossless)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}; use one of {IMAGE_EXTENSIONS}")
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    with atomic_write(path, "wb") as fh:
        img.save(fh, format=fmt, **kwargs)


@dataclass
class SkipReport:
    """Files a batch job skipped, with the reason for each; the job goes on and reports them at the end."""

    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, path: str | Path, reason: str) -> None:
        """Record that ``path`` was skipped because of ``reason`` (and log it once)."""
        self.skipped[str(path)] = reason
        logger.warning("skipped %s: %s", path, reason)

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        """One line for the end of a job: how many files were skipped, or that none were."""
        if not self.skipped:
            return "no files skipped"
        return f"{len(self.skipped)} file(s) skipped (bad or unreadable images); see the skip report"

    def save(self, path: str | Path) -> None:
        """Write the report as JSON (``{"skipped": {path: reason}}``)."""
        write_json(path, {"skipped": dict(sorted(self.skipped.items()))})


def iter_images(
    paths: Iterable[str | Path], report: SkipReport, max_pixels: int = MAX_PIXELS
) -> Iterator[tuple[Path, Image.Image]]:
    """Yield ``(path, rgb_image)`` for each loadable file; bad files go into ``report`` instead of raising."""
    for p in paths:
        try:
            yield Path(p), load_image(p, max_pixels=max_pixels)
        except BadImageError as err:
            report.add(err.path, err.reason)


def decode_image(value: dict | None, where: str) -> Image.Image:
    """An RGB PIL image from a ``datasets`` Image value (``{"bytes", "path"}``); BadImageError names ``where``."""
    if value is None:
        raise BadImageError(where, "no image in this row")
    if value.get("bytes") is None:
        return load_image(value["path"])
    try:
        with Image.open(io.BytesIO(value["bytes"])) as img:
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(where, f"undecodable image bytes ({err})") from err
