"""Heatmaps: relevance maps rendered as PNG with our own colour maps, overlays on the image, and captioned grids.

Zennit 0.5.1's ``imsave`` breaks on Pillow 13, so the colour maps are lookup tables built here with NumPy and the
images are plain RGB ``PIL.Image`` objects. Relevance is scaled symmetrically around zero (white, or the image
itself in an overlay) by a high percentile of its absolute value, so one hot pixel does not wash out the rest:
red is evidence for the explained class, blue evidence against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stda_hf.core.errors import StdaError
from stda_hf.data.images import save_image

logger = logging.getLogger(__name__)

COLORMAPS: dict[str, tuple[tuple[float, tuple[int, int, int]], ...]] = {
    "bwr": ((0.0, (0, 0, 255)), (0.5, (255, 255, 255)), (1.0, (255, 0, 0))),
    "coldnhot": (
        (0.0, (0, 255, 255)),
        (0.25, (0, 0, 255)),
        (0.5, (0, 0, 0)),
        (2 / 3, (255, 0, 0)),
        (5 / 6, (255, 255, 0)),
        (1.0, (255, 255, 255)),
    ),
    "wred": ((0.0, (255, 255, 255)), (0.5, (255, 255, 255)), (1.0, (255, 0, 0))),
}
"""Colour maps as anchors ``(position in [0, 1], RGB)``; position 0.5 is zero relevance."""

CORRECT, WRONG, TEXT = (0, 120, 0), (190, 0, 0), (20, 20, 20)


LUT_SIZE = 255
"""Entries of a colour lookup table: odd, so that zero relevance has its own entry (the middle one)."""


def colormap_lut(name: str = "bwr") -> np.ndarray:
    """The ``(LUT_SIZE, 3)`` uint8 lookup table of colour map ``name`` (one of :data:`COLORMAPS`)."""
    if name not in COLORMAPS:
        raise StdaError(f"unknown colour map {name!r}; valid: {', '.join(COLORMAPS)}")
    pos = np.array([p for p, _ in COLORMAPS[name]])
    rgb = np.array([c for _, c in COLORMAPS[name]], np.float64)
    grid = np.linspace(0.0, 1.0, LUT_SIZE)
    return np.stack([np.interp(grid, pos, rgb[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def normalise(pixels: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Scale relevance ``(H, W)`` to ``[-1, 1]`` by the ``percentile`` of its absolute value (0 stays 0)."""
    pixels = np.nan_to_num(np.asarray(pixels, np.float64))
    if pixels.ndim != 2:
        raise StdaError(f"a heatmap needs relevance of shape (H, W), got {pixels.shape}")
    scale = float(np.percentile(np.abs(pixels), percentile))
    if scale <= 0:
        scale = float(np.abs(pixels).max())
    return np.clip(pixels / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(pixels)


def colorize(pixels: np.ndarray, cmap: str = "bwr", percentile: float = 99.5) -> Image.Image:
    """Render relevance ``(H, W)`` as an RGB image of the same size."""
    index = np.round((normalise(pixels, percentile) + 1.0) * (LUT_SIZE - 1) / 2).astype(np.uint8)
    return Image.fromarray(colormap_lut(cmap)[index], "RGB")


def overlay(
    image: Image.Image,
    pixels: np.ndarray,
    cmap: str = "bwr",
    percentile: float = 99.5,
    strength: float = 0.85,
) -> Image.Image:
    """Blend coloured relevance over a greyed copy of ``image``; weak relevance leaves the image visible."""
    norm = normalise(pixels, percentile)
    if image.size != (norm.shape[1], norm.shape[0]):
        image = image.resize((norm.shape[1], norm.shape[0]), Image.BILINEAR)
    grey = np.asarray(image.convert("L").convert("RGB"), np.float64) * 0.6 + 255 * 0.4
    colour = np.asarray(colorize(pixels, cmap, percentile), np.float64)
    alpha = (strength * np.abs(norm) ** 0.7)[..., None]
    return Image.fromarray((grey * (1 - alpha) + colour * alpha).round().astype(np.uint8), "RGB")


def save_heatmap(pixels: np.ndarray, path: str | Path, cmap: str = "bwr", percentile: float = 99.5) -> Path:
    """Write relevance ``(H, W)`` as a PNG of the same size (atomically); returns the path."""
    path = Path(path)
    save_image(colorize(pixels, cmap, percentile), path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Captioned grids


@dataclass
class Tile:
    """One picture of a grid and the caption lines under it (the first line may be coloured)."""

    image: Image.Image
    lines: tuple[str, ...] = ()
    colour: tuple[int, int, int] = TEXT  # colour of the first caption line


def prediction_tiles(
    image: Image.Image,
    pixels: np.ndarray,
    predicted: str,
    probability: float,
    true_label: str | None,
    origin: str = "real",
    note: str = "",
    cmap: str = "bwr",
) -> list[Tile]:
    """The image captioned with its true label and origin, and its overlay captioned with the prediction.

    The prediction line is green when it matches the true label, red when it does not, black when the true
    label is unknown. ``note`` is an extra line under the overlay (e.g. the relevance inside the lesion).
    """
    colour = TEXT if true_label is None else (CORRECT if predicted == true_label else WRONG)
    left = Tile(image, (f"true: {true_label or 'unknown'}", f"origin: {origin}"))
    right = Tile(overlay(image, pixels, cmap), (f"pred: {predicted} {probability:.2f}", note), colour)
    return [left, right]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_grid(
    tiles: list[Tile], columns: int, tile_size: int = 128, title: str = "", legend: bool = True
) -> Image.Image:
    """Lay ``tiles`` out ``columns`` to a row, each scaled to ``tile_size`` with its caption underneath.

    Parameters
    ----------
    tiles : list of Tile
        Pictures in reading order.
    columns : int
        Tiles per row.
    tile_size : int
        Side of each picture in the grid (small images are enlarged without smoothing).
    title : str
        A line above the grid.
    legend : bool
        Add the colour key under the grid.

    Returns
    -------
    PIL.Image.Image
        The grid (RGB, white background).
    """
    if not tiles:
        raise StdaError("nothing to draw: the grid has no images")
    if columns < 1 or tile_size < 16:
        raise StdaError(f"grid needs columns >= 1 and tile_size >= 16, got {columns} and {tile_size}")
    font = _font(max(9, tile_size // 11))
    line_h = font.getbbox("Ag")[3] + 3
    n_lines = max(len(t.lines) for t in tiles)
    cell_w, cell_h, pad = tile_size, tile_size + n_lines * line_h, 6
    rows = -(-len(tiles) // columns)
    top = line_h + pad if title else pad
    bottom = 2 * line_h + pad if legend else 0
    width = columns * (cell_w + pad) + pad
    grid = Image.new("RGB", (width, top + rows * (cell_h + pad) + bottom), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad // 2), title, fill=TEXT, font=font)
    for i, tile in enumerate(tiles):
        x, y = pad + (i % columns) * (cell_w + pad), top + (i // columns) * (cell_h + pad)
        grid.paste(_fit(tile.image, tile_size), (x, y))
        for j, line in enumerate(tile.lines):
            draw.text(
                (x, y + tile_size + 1 + j * line_h), line, fill=tile.colour if j == 0 else TEXT, font=font
            )
    if legend:
        _draw_legend(grid, draw, font, pad, grid.height - bottom + pad // 2, line_h)
    return grid


def _fit(image: Image.Image, size: int) -> Image.Image:
    resample = Image.NEAREST if max(image.size) < size else Image.LANCZOS
    return image.convert("RGB").resize((size, size), resample)


def _draw_legend(grid: Image.Image, draw: ImageDraw.ImageDraw, font, x: int, y: int, line_h: int) -> None:
    bar_w = min(160, grid.width // 3)
    bar = Image.fromarray(np.repeat(colormap_lut("bwr")[None], line_h - 2, axis=0), "RGB").resize(
        (bar_w, line_h - 2)
    )
    draw.text((x, y), "against", fill=TEXT, font=font)
    left = x + int(draw.textlength("against ", font=font))
    grid.paste(bar, (left, y + 2))
    draw.text((left + bar_w + 4, y), "for the explained class", fill=TEXT, font=font)


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    """Write a grid as PNG (atomically); returns the path."""
    path = Path(path)
    save_image(grid, path)
    return path
