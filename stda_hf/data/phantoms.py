"""Phantom lesions: procedural dermoscopy-like images, the offline default data source.

Each phantom is drawn from a lesion whose benign or malignant look follows the ABCD cues of dermoscopy:
**A**symmetry of the outline, **B**order irregularity (and a sharper cut-off), **C**olour variegation (more
colours, blue-white veil, black dots at the periphery) and **D**iameter. The cues of the two classes are drawn
from overlapping distributions, so the task is learnable but not trivial.

Patients have several lesions and lesions several images (views: rotation, zoom, shift, lighting, hairs), so
the grouping of ``stda split`` matters exactly as with ISIC data. Optional artifacts (ruler, colour patch,
marker ink, dark dermoscope corners) appear at per-class rates, so a shortcut can be planted on purpose and
found again by the explanations; where each artifact was drawn is saved as a label map in ``artifacts/``.

Images are square by default; ``aspect`` renders them wider (or taller) than high, as dermoscopy photographs
are (ISIC 2017: 4:3 and 3:2), with the lesion near the centre sized to the shorter side and the artifacts laid
out along the frame's own edges and corners. Several aspects give a mix, one drawn per image.

The output is the real-image layout of ``stda_hf.data.real``: ``images/``, ``masks/`` (binary lesion masks),
``artifacts/``, ``metadata.csv``, ``ATTRIBUTION.md`` and ``LICENSES/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import map_coordinates

from stda_hf.core.config import changed_settings, config_to_dict, dump_config, load_config, read_settings
from stda_hf.core.errors import StdaError
from stda_hf.core.utils import check_seed, progress
from stda_hf.data.images import check_side, save_image
from stda_hf.data.licenses import write_attribution
from stda_hf.data.real import ARTIFACTS, PHANTOM_ATTRIBUTION, write_metadata

logger = logging.getLogger(__name__)

DEFAULT_ARTIFACT_RATES = {
    "ruler": (0.1, 0.1),
    "patch": (0.05, 0.05),
    "ink": (0.05, 0.05),
    "dark_corners": (0.2, 0.2),
}
ATTRIBUTION = PHANTOM_ATTRIBUTION
LICENSE = "CC-0"

# Fitzpatrick-like skin tones I..VI (RGB) and how often each is drawn: skewed to light skin, as ISIC is.
SKIN_TONES = np.array(
    [[240, 208, 188], [226, 186, 160], [200, 155, 122], [165, 118, 85], [120, 82, 58], [85, 58, 42]],
    np.float32,
)
SKIN_TYPES = ("I", "II", "III", "IV", "V", "VI")
SKIN_PROBS = (0.25, 0.35, 0.2, 0.1, 0.06, 0.04)
PALETTE = {  # dermoscopic colours
    "light_brown": (176, 120, 82),
    "dark_brown": (96, 56, 36),
    "black": (34, 24, 22),
    "red": (168, 72, 64),
    "blue_gray": (104, 112, 138),
    "white_blue": (178, 190, 212),
}


MAX_SIZE = 4096
"""Largest phantom side: rendering holds float64 arrays of size x size x 2 (256 MiB each at 4096 px)."""
MIN_SIZE = 16
"""Smallest phantom side, the shorter one of a non-square image included."""
MAX_ASPECT = 4.0
"""Widest (and, inverted, tallest) aspect ratio accepted: beyond it the lesion is a sliver of the frame."""


def parse_aspect(text: str) -> tuple[int, int]:
    """``"3:2"`` -> ``(3, 2)``: an aspect ratio as width and height.

    Raises
    ------
    StdaError
        Not two positive whole numbers joined by ``:``, or a ratio beyond :data:`MAX_ASPECT` either way.
    """
    width, sep, height = str(text).partition(":")
    if not (sep and width.strip().isdecimal() and height.strip().isdecimal()) or 0 in (
        int(width),
        int(height),
    ):
        quote = (
            " (in a YAML file quote it, '3:2': YAML reads 3:2 as the number 182)"
            if width.strip().isdecimal() and not sep
            else ""
        )
        raise StdaError(f"--aspect {text!r}: give WIDTH:HEIGHT in whole numbers, e.g. 1:1, 4:3 or 3:2{quote}")
    w, h = int(width), int(height)
    if max(w / h, h / w) > MAX_ASPECT:
        raise StdaError(
            f"--aspect {text!r}: the ratio must lie between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1"
        )
    return w, h


def frame_size(size: int, aspect: str) -> tuple[int, int]:
    """``(width, height)`` of an image whose longer side is ``size`` pixels at ``aspect`` (``"W:H"``)."""
    w, h = parse_aspect(aspect)
    if w >= h:
        return size, max(1, round(size * h / w))
    return max(1, round(size * w / h)), size


@dataclass
class PhantomConfig:
    """Settings of ``stda phantoms``."""

    n: int = 400  # number of images
    size: int = 224  # image side in pixels (the longer side when --aspect is not 1:1)
    aspect: tuple[str, ...] = ("1:1",)  # width:height (default 1:1), e.g. 4:3 3:2; several: one per image
    seed: int = 0  # same seed, same images
    malignant_fraction: float = 0.5  # share of malignant lesions
    max_lesions_per_patient: int = 3  # each patient has 1..this many lesions
    max_images_per_lesion: int = 3  # each lesion is photographed 1..this many times
    hair: float = 0.4  # probability that an image shows hairs
    image_format: str = "jpg"  # jpg (like ISIC) or png
    artifacts: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_ARTIFACT_RATES))
    # ^ artifact -> (rate in benign images, rate in malignant images); unequal rates plant a shortcut

    def __post_init__(self) -> None:
        if self.n < 1:
            raise StdaError(f"--n {self.n}: need at least one image")
        check_seed("--seed", self.seed)
        why = "each is rendered in memory as float arrays of size x size"
        check_side("--size", self.size, MIN_SIZE, MAX_SIZE, "phantoms", why, bytes_per_pixel=16)
        if not self.aspect:
            raise StdaError("--aspect: give at least one WIDTH:HEIGHT, e.g. 1:1")
        if isinstance(self.aspect, str):  # PhantomConfig(aspect="4:3"): one aspect, not its characters
            self.aspect = (self.aspect,)
        self.aspect = tuple(str(a).strip() for a in self.aspect)
        for aspect in self.aspect:
            if min(frame_size(self.size, aspect)) < MIN_SIZE:
                raise StdaError(
                    f"--aspect {aspect} at --size {self.size}: the shorter side would be "
                    f"{min(frame_size(self.size, aspect))} px, fewer than {MIN_SIZE}; raise --size"
                )
        if not 0.0 <= self.malignant_fraction <= 1.0:
            raise StdaError(f"malignant_fraction {self.malignant_fraction} must be between 0 and 1")
        if self.image_format not in ("jpg", "png"):
            raise StdaError(f"image_format {self.image_format!r}: use 'jpg' or 'png'")
        unknown = sorted(set(self.artifacts) - set(ARTIFACTS))
        if unknown:
            raise StdaError(f"unknown artifact(s) {unknown}; valid: {list(ARTIFACTS)}")
        rates = {}
        for name, pair in self.artifacts.items():
            pair = tuple(float(x) for x in pair)
            if len(pair) != 2 or not all(0.0 <= x <= 1.0 for x in pair):
                raise StdaError(f"artifact {name}: give two rates in [0, 1] (benign, malignant), got {pair}")
            rates[name] = pair
        self.artifacts = {name: rates.get(name, (0.0, 0.0)) for name in ARTIFACTS}


def parse_artifact_rates(specs: list[str]) -> dict[str, tuple[float, float]]:
    """Parse ``["patch=0.5,0", "ruler=0.1"]`` (one rate means both classes) into a rates dict."""
    rates = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            parts = [float(x) for x in value.split(",")] if sep else []
        except ValueError:
            parts = []
        if name not in ARTIFACTS or len(parts) not in (1, 2):
            raise StdaError(
                f"--artifact {spec!r}: expected NAME=RATE or NAME=BENIGN_RATE,MALIGNANT_RATE with NAME in {list(ARTIFACTS)}"
            )
        rates[name] = (parts[0], parts[-1])
    return rates


# ----------------------------------------------------------------------------------------------------------------
# The lesion: cues drawn once per lesion, rendered in lesion coordinates so that every view shows the same lesion.


@dataclass
class Lesion:
    """The latent description of one lesion (everything a view of it shares)."""

    malignant: bool
    asymmetry: float  # 0..1
    border: float  # 0..1, irregularity of the outline and sharpness of its cut-off
    colour: float  # 0..1, colour variegation
    diameter: float  # fraction of the image side
    elongation: float
    harmonics: np.ndarray  # (K, 3): frequency, amplitude, phase of the outline
    base: np.ndarray  # (3,) base pigment
    blobs: list  # (u, v, sigma, rgb, strength)
    dots: np.ndarray  # (M, 3): u, v, radius of black dots
    veil: tuple | None  # (u, v, sigma) of a blue-white veil
    noise: np.ndarray  # (16, 16) texture field in lesion coordinates
    net_freq: float
    net_jitter: float


def draw_lesion(rng: np.random.Generator, malignant: bool) -> Lesion:
    """Draw a lesion's ABCD cues from class-conditional, overlapping distributions."""
    a, b = (5.0, 2.2) if malignant else (2.2, 5.0)
    asym, border, colour = rng.beta(a, b), rng.beta(a, b), rng.beta(a, b)
    diameter = float(np.clip(rng.normal(0.40 if malignant else 0.31, 0.07), 0.14, 0.62))
    low = [
        (k, asym * amp * rng.uniform(0.5, 1.0), rng.uniform(0, 2 * np.pi))
        for k, amp in ((1, 0.22), (2, 0.18), (3, 0.1))
    ]
    high = [
        (k, border * 0.16 / k**0.9 * rng.uniform(0.0, 1.0), rng.uniform(0, 2 * np.pi)) for k in range(4, 17)
    ]
    base = (
        np.array(PALETTE["light_brown"], np.float32) * (1 - (t := rng.uniform(0, 1)))
        + np.array(PALETTE["dark_brown"], np.float32) * t
    )
    n_blobs = 1 + round(colour * 4 * rng.uniform(0.6, 1.2))
    names = ["dark_brown", "black", "red", "blue_gray", "light_brown"]
    probs = np.array([0.35, 0.2 * colour + 0.05, 0.15 * colour + 0.05, 0.2 * colour + 0.02, 0.2])
    blobs = []
    for _ in range(n_blobs):
        r, ang = np.sqrt(rng.uniform(0, 0.7)), rng.uniform(0, 2 * np.pi)
        name = names[rng.choice(len(names), p=probs / probs.sum())]
        strength = rng.uniform(0.3, 0.55) + 0.35 * colour
        blobs.append(
            (
                r * np.cos(ang),
                r * np.sin(ang),
                rng.uniform(0.18, 0.5),
                np.array(PALETTE[name], np.float32),
                strength,
            )
        )
    n_dots = rng.poisson(14 * colour**2 if malignant else 3 * colour**2)
    r = rng.uniform(0.55, 0.98, n_dots) if malignant else rng.uniform(0.0, 0.7, n_dots)
    ang = rng.uniform(0, 2 * np.pi, n_dots)
    dots = np.stack([r * np.cos(ang), r * np.sin(ang), rng.uniform(0.025, 0.055, n_dots)], axis=1)
    veil = None
    if rng.uniform() < (0.6 * colour if malignant else 0.12 * colour):
        r, ang = rng.uniform(0, 0.5), rng.uniform(0, 2 * np.pi)
        veil = (r * np.cos(ang), r * np.sin(ang), rng.uniform(0.2, 0.4))
    return Lesion(
        malignant=malignant,
        asymmetry=float(asym),
        border=float(border),
        colour=float(colour),
        diameter=diameter,
        elongation=float(rng.uniform(0.0, 0.25 + 0.2 * asym)),
        harmonics=np.array(low + high, np.float32),
        base=base.astype(np.float32),
        blobs=blobs,
        dots=dots.astype(np.float32),
        veil=veil,
        noise=rng.normal(0, 1, (16, 16)).astype(np.float32),
        net_freq=float(rng.uniform(9, 14)),
        net_jitter=float(0.3 + 2.2 * border * colour if malignant else 0.2 + 0.8 * border),
    )


def _sample(field_: np.ndarray, u: np.ndarray, v: np.ndarray, extent: float = 1.6) -> np.ndarray:
    """Bilinearly sample a small grid spanning ``[-extent, extent]^2`` of lesion coordinates at ``(u, v)``."""
    n = field_.shape[0] - 1
    gu = (u + extent) / (2 * extent) * n
    gv = (v + extent) / (2 * extent) * n
    return map_coordinates(field_, [gv.ravel(), gu.ravel()], order=1, mode="nearest").reshape(u.shape)


def render_lesion(lesion: Lesion, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pigment colour ``(H, W, 3)`` and coverage ``(H, W)`` in [0, 1] at lesion coordinates ``(u, v)``.

    ``(u, v)`` are in units of the lesion radius, so the outline sits near ``rho = 1``.
    """
    ue = u / (1.0 + lesion.elongation)
    rho, theta = np.hypot(ue, v), np.arctan2(v, ue)
    k, amp, phase = (
        lesion.harmonics[:, 0, None, None],
        lesion.harmonics[:, 1, None, None],
        lesion.harmonics[:, 2, None, None],
    )
    outline = 1.0 + (amp * np.cos(k * theta[None] + phase)).sum(0)
    t = rho / np.maximum(outline, 0.35)  # < 1 inside
    edge = 0.10 - 0.075 * lesion.border  # benign: fuzzy fading border; malignant: abrupt cut-off
    coverage = 1.0 / (1.0 + np.exp(np.clip((t - 1.0) / edge, -50, 50)))

    noise = _sample(lesion.noise, u, v)
    colour = np.broadcast_to(lesion.base, (*u.shape, 3)).copy()
    colour *= (1.0 - 0.22 * (1.0 - np.clip(t, 0, 1) ** 2))[..., None] if not lesion.malignant else 1.0
    for bu, bv, sigma, rgb, strength in lesion.blobs:
        w = (
            strength
            * np.exp(-((u - bu) ** 2 + (v - bv) ** 2) / (2 * sigma**2))
            * (1 + 0.3 * noise).clip(0, 2)
        )
        colour += np.clip(w, 0, 1)[..., None] * (rgb - colour)
    if lesion.veil is not None:
        vu, vv, sigma = lesion.veil
        w = 0.75 * np.exp(-((u - vu) ** 2 + (v - vv) ** 2) / (2 * sigma**2))
        colour += w[..., None] * (np.array(PALETTE["white_blue"], np.float32) - colour)
    jitter = lesion.net_jitter * noise
    lines = np.exp(-(np.sin(lesion.net_freq * u + jitter) ** 2) / 0.04) + np.exp(
        -(np.sin(lesion.net_freq * v - jitter) ** 2) / 0.04
    )
    colour *= (1.0 - 0.14 * np.clip(lines, 0, 1))[
        ..., None
    ]  # reticular pigment network, atypical when jittered
    for du, dv, r in lesion.dots:
        d = np.hypot(u - du, v - dv)
        w = np.clip((r - d) / (0.4 * r) + 1.0, 0.0, 1.0)
        colour += w[..., None] * (np.array(PALETTE["black"], np.float32) - colour)
    return colour, coverage


# ----------------------------------------------------------------------------------------------------------------
# A view: skin, lighting, the lesion placed in the frame, hairs and artifacts.


def _smooth_noise(rng: np.random.Generator, frame: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise of shape ``(height, width)`` with about ``cells`` cells along the shorter side."""
    w, h = frame
    grid_h, grid_w = max(cells, round(cells * h / w)), max(cells, round(cells * w / h))  # square cells
    grid = rng.normal(0, 1, (grid_h, grid_w)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC))


def _frame_radius(frame: tuple[int, int]) -> float:
    """Half-diagonal over sqrt(2): half the side of a square frame (exactly), so that lighting and dark corners
    reach a non-square frame's corners as they reach a square one's."""
    w, h = frame
    return float(np.sqrt((w * w + h * h) / 8))


def render_view(
    rng: np.random.Generator,
    lesion: Lesion,
    skin: np.ndarray,
    size: int | tuple[int, int],
    hair: float,
    artifacts: tuple[str, ...],
    paint: tuple[str, ...] | None = None,
) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Render one photograph of ``lesion``: RGB image, binary lesion mask and artifact label map (uint8).

    ``size`` is the side of a square image or its ``(width, height)``. The lesion's diameter is a fraction of
    the shorter side and its centre lies near the frame's. Artifacts are drawn in the order given; only those
    in ``paint`` (default: all) reach the image, the others are drawn onto a scratch copy so the random stream,
    and so every other artifact, stays the same.
    """
    frame = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    w, h = frame
    short = min(w, h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    angle, scale = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15)
    shift = 0.5 + rng.uniform(-0.08, 0.08, 2)
    cx, cy = w * shift[0], h * shift[1]
    radius = lesion.diameter * short * scale / 2
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy

    tone = skin * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    mottling = (
        1.0 + 0.05 * _smooth_noise(rng, frame, 6) + 0.02 * _smooth_noise(rng, frame, max(8, short // 6))
    )
    img = tone * mottling[..., None] + rng.normal(0, 2.5, (h, w, 3)).astype(np.float32)
    pigment, coverage = render_lesion(lesion, u, v)
    opacity = rng.uniform(0.85, 1.0)
    img += (opacity * coverage)[..., None] * (pigment * (0.75 + 0.25 * mottling[..., None]) - img)

    r = np.hypot(xx - w / 2, yy - h / 2) / _frame_radius(frame)
    light = rng.uniform(0.92, 1.06) * (1.0 - 0.12 * r**2) * (1.0 + 0.05 * (xx - w / 2) / w * rng.normal())
    img = np.clip(img * light[..., None], 0, 255).astype(np.uint8)

    pil = Image.fromarray(img, "RGB")
    if rng.uniform() < hair:
        _draw_hairs(rng, pil, frame)
    labels = np.zeros((h, w), np.uint8)
    for name in artifacts:
        shown = paint is None or name in paint
        target, target_labels = (pil, labels) if shown else (pil.copy(), labels.copy())
        _ARTIFACT_DRAWERS[name](rng, target, target_labels, frame, (cx, cy, radius))
    mask = (coverage > 0.5).astype(np.uint8) * 255
    return pil, mask, labels


def _draw_hairs(rng: np.random.Generator, img: Image.Image, frame: tuple[int, int]) -> None:
    draw, extent, short = ImageDraw.Draw(img), np.array(frame), min(frame)
    width = max(1, round(short / 160))
    for _ in range(rng.integers(1, 12)):
        p0, p2 = rng.uniform(-0.1, 1.1, 2) * extent, rng.uniform(-0.1, 1.1, 2) * extent
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * short, 2)
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        shade = int(rng.uniform(20, 70))
        draw.line([tuple(p) for p in pts], fill=(shade, int(shade * 0.8), int(shade * 0.7)), width=width)


def _mark(labels: np.ndarray, region: Image.Image, code: int) -> None:
    labels[np.asarray(region) > 0] = code


def _draw_ruler(rng, img, labels, frame, lesion_frame) -> None:
    (w, h), short = frame, min(frame)
    band = max(3, round(0.07 * short))
    side = rng.integers(4)  # top, bottom, left, right
    region = Image.new("L", img.size, 0)
    box = [
        (0, 0, w, band),
        (0, h - band, w, h),
        (0, 0, band, h),
        (w - band, 0, w, h),
    ][side]
    ImageDraw.Draw(img).rectangle(box, fill=(226, 222, 205))
    ImageDraw.Draw(region).rectangle(box, fill=1)
    draw, step, tick = ImageDraw.Draw(img), max(2, round(0.035 * short)), max(1, short // 224)
    for i, pos in enumerate(range(step, w if side < 2 else h, step)):
        length = band * (0.8 if i % 5 == 4 else 0.45)
        if side < 2:
            y0 = box[1] if side == 0 else box[3] - length
            draw.line([(pos, y0), (pos, y0 + length)], fill=(20, 20, 20), width=tick)
        else:
            x0 = box[0] if side == 2 else box[2] - length
            draw.line([(x0, pos), (x0 + length, pos)], fill=(20, 20, 20), width=tick)
    _mark(labels, region, ARTIFACTS.index("ruler") + 1)


def _draw_patch(rng, img, labels, frame, lesion_frame) -> None:
    w, h = frame
    cell = max(2, round(0.055 * min(frame)))
    corner = rng.integers(4)
    x0 = 2 if corner % 2 == 0 else w - 3 * cell - 2
    y0 = 2 if corner < 2 else h - 2 * cell - 2
    colours = [(200, 30, 30), (30, 160, 40), (30, 60, 190), (230, 210, 40), (245, 245, 245), (120, 120, 120)]
    draw, region = ImageDraw.Draw(img), Image.new("L", img.size, 0)
    for i, c in enumerate(colours):
        box = (
            x0 + (i % 3) * cell,
            y0 + (i // 3) * cell,
            x0 + (i % 3 + 1) * cell - 1,
            y0 + (i // 3 + 1) * cell - 1,
        )
        draw.rectangle(box, fill=c)
    ImageDraw.Draw(region).rectangle((x0, y0, x0 + 3 * cell - 1, y0 + 2 * cell - 1), fill=1)
    _mark(labels, region, ARTIFACTS.index("patch") + 1)


def _draw_ink(rng, img, labels, frame, lesion_frame) -> None:
    cx, cy, radius = lesion_frame
    start = rng.uniform(0, 2 * np.pi)
    ang = start + np.linspace(0, rng.uniform(0.6, 1.6), 20)
    rr = radius * rng.uniform(1.25, 1.6) * (1 + 0.05 * np.sin(3 * ang))
    pts = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for r, a in zip(rr, ang, strict=True)]
    width = max(2, round(0.03 * min(frame)))
    overlay, region = Image.new("RGBA", img.size, (0, 0, 0, 0)), Image.new("L", img.size, 0)
    ImageDraw.Draw(overlay).line(pts, fill=(110, 50, 150, 190), width=width, joint="curve")
    ImageDraw.Draw(region).line(pts, fill=1, width=width, joint="curve")
    img.paste(Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB"))
    _mark(labels, region, ARTIFACTS.index("ink") + 1)


def _draw_dark_corners(rng, img, labels, frame, lesion_frame) -> None:
    w, h = frame  # the dermoscope's round field of view, as wide as a square frame's: it cuts the corners
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    r = np.hypot(xx - w / 2, yy - h / 2) / _frame_radius(frame)
    edge = rng.uniform(0.95, 1.12)
    dark = np.clip((r - edge) / 0.06, 0, 1)
    arr = np.asarray(img, np.float32) * (1 - dark[..., None]) + 8 * dark[..., None]
    img.paste(Image.fromarray(arr.astype(np.uint8), "RGB"))
    labels[dark > 0.5] = ARTIFACTS.index("dark_corners") + 1


_ARTIFACT_DRAWERS = {
    "ruler": _draw_ruler,
    "patch": _draw_patch,
    "ink": _draw_ink,
    "dark_corners": _draw_dark_corners,
}


# ----------------------------------------------------------------------------------------------------------------
# The folder.


@dataclass(frozen=True)
class _Plan:
    isic_id: str
    lesion_id: str
    patient_id: str
    patient: int
    lesion: int
    view: int


def plan_images(cfg: PhantomConfig) -> list[_Plan]:
    """Patients -> lesions -> views, until ``cfg.n`` images; a prefix of the plan for any larger ``n``."""
    plans, patient = [], 0
    while len(plans) < cfg.n:
        rng = np.random.default_rng([cfg.seed, patient])
        for lesion in range(int(rng.integers(1, cfg.max_lesions_per_patient + 1))):
            lesion_no = len({p.lesion_id for p in plans}) + 1
            for view in range(int(rng.integers(1, cfg.max_images_per_lesion + 1))):
                if len(plans) == cfg.n:
                    break
                plans.append(
                    _Plan(
                        f"PHANTOM_{len(plans) + 1:07d}",
                        f"PL_{lesion_no:07d}",
                        f"PP_{patient + 1:07d}",
                        patient,
                        lesion,
                        view,
                    )
                )
        patient += 1
    return plans


@dataclass(frozen=True)
class PhantomView:
    """One rendered phantom: the image, its lesion mask and artifact label map, and what it shows."""

    image: Image.Image
    mask: np.ndarray
    labels: np.ndarray  # artifact label map (0 = none)
    artifacts: tuple[str, ...]
    lesion: Lesion
    skin_type: int


def view_frame(cfg: PhantomConfig, plan: _Plan) -> tuple[int, int]:
    """``(width, height)`` of the image ``plan`` names: one of ``cfg.aspect``, drawn per image when there are
    several (from a stream of its own, so a square folder's images are the same with or without this choice)."""
    if len(cfg.aspect) == 1:
        return frame_size(cfg.size, cfg.aspect[0])
    rng = np.random.default_rng([cfg.seed, plan.patient, plan.lesion, plan.view + 1, 2])
    return frame_size(cfg.size, cfg.aspect[int(rng.integers(len(cfg.aspect)))])


def render_plan(cfg: PhantomConfig, plan: _Plan, artifacts: tuple[str, ...] | None = None) -> PhantomView:
    """Render the image ``plan`` names, deterministically for ``cfg.seed``.

    With ``artifacts`` the same photograph (skin, lesion, lighting, hairs) is rendered with exactly those
    artifacts instead of the ones its class's rates drew: the intervention that removes an artifact from an
    image, or pastes one onto it, and changes nothing else.
    """
    prng = np.random.default_rng([cfg.seed, plan.patient, 10**6])
    skin_type = int(prng.choice(len(SKIN_TYPES), p=SKIN_PROBS))
    skin = SKIN_TONES[skin_type] * prng.uniform(0.96, 1.04, 3)
    lrng = np.random.default_rng([cfg.seed, plan.patient, plan.lesion])
    lesion = draw_lesion(lrng, malignant=bool(lrng.uniform() < cfg.malignant_fraction))
    vrng = np.random.default_rng([cfg.seed, plan.patient, plan.lesion, plan.view + 1])
    label = 1 if lesion.malignant else 0
    drawn = tuple(a for a in ARTIFACTS if vrng.uniform() < cfg.artifacts[a][label])
    frame = view_frame(cfg, plan)
    if artifacts is None:
        img, mask, labels = render_view(vrng, lesion, skin, frame, cfg.hair, drawn)
        return PhantomView(img, mask, labels, drawn, lesion, skin_type)
    unknown = sorted(set(artifacts) - set(ARTIFACTS))
    if unknown:
        raise StdaError(f"unknown artifact(s) {unknown}; valid: {list(ARTIFACTS)}")
    order = drawn + tuple(a for a in ARTIFACTS if a in artifacts and a not in drawn)  # pasted ones last
    img, mask, labels = render_view(vrng, lesion, skin, frame, cfg.hair, order, paint=tuple(artifacts))
    return PhantomView(img, mask, labels, tuple(a for a in order if a in artifacts), lesion, skin_type)


def phantom_plan(root: str | Path) -> tuple[PhantomConfig, dict[str, _Plan]]:
    """The settings a phantom folder was made with and its plan, ``{isic_id: plan}``, to re-render its images.

    Raises
    ------
    StdaError
        ``root`` holds no ``phantoms.yaml`` (not a phantom folder).
    """
    settings = Path(root) / "phantoms.yaml"
    if not settings.is_file():
        raise StdaError(
            f"{root}: no phantoms.yaml; artifacts can be removed or pasted only on phantom folders"
        )
    cfg = load_config(PhantomConfig, settings)
    return cfg, {p.isic_id: p for p in plan_images(cfg)}


def rerender(
    root: str | Path, isic_id: str, artifacts: tuple[str, ...], plan: tuple | None = None
) -> PhantomView:
    """Re-render phantom ``isic_id`` of the phantom folder ``root`` with exactly ``artifacts``.

    ``plan`` is :func:`phantom_plan`'s answer for ``root``, when the caller re-renders many images.

    Raises
    ------
    StdaError
        ``root`` holds no ``phantoms.yaml`` (not a phantom folder), or no image of that id.
    """
    cfg, plans = plan or phantom_plan(root)
    if isic_id not in plans:
        raise StdaError(f"{root}: no phantom {isic_id!r} in its plan of {cfg.n} images")
    return render_plan(cfg, plans[isic_id], artifacts)


def make_phantoms(out: str | Path, cfg: PhantomConfig | None = None, overwrite: bool = False) -> Path:
    """Write ``cfg.n`` phantom images in the real-image layout under ``out``; deterministic for a seed.

    Parameters
    ----------
    out : path
        Output folder (created).
    cfg : PhantomConfig, optional
        Sizes, seed, class balance, hair and artifact rates.
    overwrite : bool
        Allow replacing a folder generated with other settings.

    Returns
    -------
    Path
        The ``metadata.csv`` written.
    """
    cfg = cfg or PhantomConfig()
    out = Path(out)
    settings = out / "phantoms.yaml"
    if (out / "metadata.csv").exists() and not overwrite:
        previous = read_settings(settings)
        if previous is None or changed_settings({"aspect": ["1:1"], **previous}, config_to_dict(cfg)):
            # ^ a folder written before --aspect existed holds square images
            raise StdaError(
                f"{out} already holds images made with other settings; pass --overwrite or another --out"
            )
    rows = []
    for plan in progress(plan_images(cfg), desc="phantoms", unit="img"):
        view = render_plan(cfg, plan)
        img, mask, labels, present, lesion, skin_type = (
            view.image,
            view.mask,
            view.labels,
            view.artifacts,
            view.lesion,
            view.skin_type,
        )
        save_image(img, out / "images" / f"{plan.isic_id}.{cfg.image_format}")
        save_image(Image.fromarray(mask, "L"), out / "masks" / f"{plan.isic_id}.png")
        if present:
            save_image(Image.fromarray(labels, "L"), out / "artifacts" / f"{plan.isic_id}.png")
        rows.append(
            {
                "isic_id": plan.isic_id,
                "diagnosis_1": "Malignant" if lesion.malignant else "Benign",
                "lesion_id": plan.lesion_id,
                "patient_id": plan.patient_id,
                "image_type": "dermoscopic",
                "copyright_license": LICENSE,
                "attribution": ATTRIBUTION,
                "skin_type": SKIN_TYPES[skin_type],
                "asymmetry": f"{lesion.asymmetry:.3f}",
                "border": f"{lesion.border:.3f}",
                "colour_variegation": f"{lesion.colour:.3f}",
                "diameter_fraction": f"{lesion.diameter:.3f}",
                "artifacts": ";".join(present),
            }
        )
    write_metadata(out, rows)
    write_attribution(out, rows, title="Attribution: phantom lesions")
    dump_config(cfg, settings)
    logger.info("wrote %d phantom images to %s", len(rows), out)
    return out / "metadata.csv"
