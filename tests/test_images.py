"""Safe image loading: every mode to RGB, EXIF orientation, and clear refusals of bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stda_hf.core.errors import BadImageError
from stda_hf.data.images import SkipReport, iter_images, load_image, save_image


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB", "1", "F"])
def test_any_mode_loads_as_rgb(tmp_path, mode):
    img = Image.new(mode, (12, 7))
    path = tmp_path / ("x.tif" if mode == "F" else "x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.size == (12, 7)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    px = np.asarray(load_image(tmp_path / "d.png"))[..., 0]
    assert px[0, 0] == 0 and px[1, 1] == 255 and 0 < px[1, 0] < 255


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (10, 20)


def test_decompression_bomb_is_refused(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(tmp_path / "big.png", max_pixels=5000)


def test_truncated_jpeg_is_refused_with_file_name(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadImageError, match=r"cut\.jpg: truncated or corrupt"):
        load_image(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"hello, not an image", "not an image"), (b"", "empty"), (None, "not found")],
)
def test_non_images_are_refused(tmp_path, content, reason):
    path = tmp_path / "f.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason):
        load_image(path)


def test_loaded_image_outlives_the_file(tmp_path):
    Image.new("RGB", (5, 5), "blue").save(tmp_path / "b.png")
    img = load_image(tmp_path / "b.png")
    (tmp_path / "b.png").unlink()
    assert img.getpixel((2, 2)) == (0, 0, 255)


def test_batch_skips_bad_files_and_reports_them(tmp_path):
    Image.new("RGB", (5, 5)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("nope")
    report = SkipReport()
    loaded = [p.name for p, _ in iter_images([tmp_path / "good.png", tmp_path / "bad.png"], report)]
    assert loaded == ["good.png"]
    assert list(report.skipped) == [str(tmp_path / "bad.png")]
    assert report.summary().startswith("1 file(s) skipped")
    report.save(tmp_path / "skipped.json")
    assert "bad.png" in (tmp_path / "skipped.json").read_text()


def test_save_image_round_trips_png_and_refuses_unknown_extension(tmp_path):
    img = Image.new("RGB", (6, 6), (1, 2, 3))
    save_image(img, tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown image extension"):
        save_image(img, tmp_path / "a.xyz")
