"""Heatmap rendering: our own colour maps on Pillow 13, overlays, captioned grids, valid PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stda_hf.attribution.heatmaps import (
    CORRECT,
    LUT_SIZE,
    WRONG,
    Tile,
    colorize,
    colormap_lut,
    normalise,
    overlay,
    prediction_tiles,
    render_grid,
    save_grid,
    save_heatmap,
)
from stda_hf.core.errors import StdaError


def _relevance(h: int = 24, w: int = 40) -> np.ndarray:
    r = np.zeros((h, w))
    r[2:6, 3:9] = 1.0  # evidence for
    r[10:14, 20:30] = -0.5  # evidence against
    return r


def test_heatmap_png_is_valid_and_has_the_relevance_size(tmp_path):
    path = save_heatmap(_relevance(24, 40), tmp_path / "sub" / "h.png")
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (40, 24)
        assert img.mode == "RGB"


def test_colours_follow_the_sign_with_white_at_zero():
    arr = np.asarray(colorize(_relevance()))
    assert tuple(arr[4, 5]) == (255, 0, 0)  # strongest positive: red
    assert tuple(arr[0, 0]) == (255, 255, 255)  # zero: white
    r, g, b = arr[12, 25]
    assert b == 255 and r < 255 and r == g  # negative: towards blue


def test_one_hot_pixel_does_not_wash_out_the_rest():
    r = np.ones((20, 20))
    r[0, 0] = 1000.0
    norm = normalise(r, percentile=99.0)
    assert norm[5, 5] == pytest.approx(1.0)


def test_all_zero_relevance_renders_white_without_dividing_by_zero():
    arr = np.asarray(colorize(np.zeros((8, 8))))
    assert (arr == 255).all()


def test_nan_relevance_is_drawn_as_zero():
    r = _relevance()
    r[0, 0] = np.nan
    assert tuple(np.asarray(colorize(r))[0, 0]) == (255, 255, 255)


def test_every_colour_map_is_an_rgb_table_with_a_middle_entry_for_zero():
    for name in ("bwr", "coldnhot", "wred"):
        lut = colormap_lut(name)
        assert lut.shape == (LUT_SIZE, 3) and lut.dtype == np.uint8 and LUT_SIZE % 2 == 1


def test_unknown_colour_map_lists_the_valid_ones():
    with pytest.raises(StdaError, match="valid: bwr, coldnhot, wred"):
        colormap_lut("viridis")


def test_relevance_must_be_two_dimensional():
    with pytest.raises(StdaError, match=r"shape \(H, W\)"):
        colorize(np.zeros((3, 8, 8)))


def test_overlay_keeps_the_image_where_relevance_is_zero_and_colours_it_elsewhere():
    image = Image.new("RGB", (40, 24), (100, 100, 100))
    arr = np.asarray(overlay(image, _relevance()))
    grey = round(100 * 0.6 + 255 * 0.4)
    assert tuple(arr[0, 0]) == (grey, grey, grey)
    r, g, b = arr[4, 5]
    assert r > g + 50 and r > b + 50


def test_overlay_resizes_the_image_to_the_relevance_map():
    image = Image.new("RGB", (80, 48), "white")
    assert overlay(image, _relevance(24, 40)).size == (40, 24)


def test_prediction_caption_is_green_when_right_and_red_when_wrong():
    image = Image.new("RGB", (16, 16))
    r = np.zeros((16, 16))
    right = prediction_tiles(image, r, "malignant", 0.9, "malignant", "real")
    wrong = prediction_tiles(image, r, "malignant", 0.9, "benign", "synthetic")
    assert right[1].colour == CORRECT and wrong[1].colour == WRONG
    assert wrong[0].lines == ("true: benign", "origin: synthetic")
    assert wrong[1].lines[0] == "pred: malignant 0.90"


def test_unknown_true_label_is_said_not_guessed():
    tiles = prediction_tiles(Image.new("RGB", (8, 8)), np.zeros((8, 8)), "benign", 0.6, None)
    assert tiles[0].lines[0] == "true: unknown"
    assert tiles[1].colour not in (CORRECT, WRONG)


def test_grid_lays_out_tiles_by_columns(tmp_path):
    tiles = [Tile(Image.new("RGB", (32, 32), "red"), ("a", "b")) for _ in range(6)]
    one_row = render_grid(tiles, columns=6, tile_size=64, legend=False)
    two_rows = render_grid(tiles, columns=3, tile_size=64, legend=False)
    assert one_row.width > two_rows.width and two_rows.height > one_row.height
    path = save_grid(two_rows, tmp_path / "grid.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == two_rows.size


def test_grid_pictures_are_scaled_to_the_tile_size():
    grid = render_grid([Tile(Image.new("RGB", (8, 8), (0, 0, 255)))], columns=1, tile_size=64, legend=False)
    arr = np.asarray(grid)
    blue = (arr[..., 2] == 255) & (arr[..., 0] == 0)
    assert blue.sum() == 64 * 64


def test_empty_grid_is_refused():
    with pytest.raises(StdaError, match="no images"):
        render_grid([], columns=2)
