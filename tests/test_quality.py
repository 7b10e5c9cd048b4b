"""The quality gate's pure parts: SSIM, the Otsu lesion outline, the style distance, the verdict and its record."""

from __future__ import annotations

import json

import pytest
import torch

from stda_hf.core.errors import StdaError
from stda_hf.generate.quality import (
    QualityGate,
    StyleDistance,
    assess,
    lesion_outline,
    luminance,
    mask_iou,
    mean_abs_change,
    otsu_threshold,
    ssim,
    verdict,
)


def _disk_phantom(size: int = 48, radius: float = 12.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark, textured disk on lighter skin: RGB (1, 3, size, size) in [0, 1] and its mask (1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2
    skin = torch.tensor([0.85, 0.65, 0.55]).view(3, 1, 1)
    lesion = torch.tensor([0.35, 0.2, 0.15]).view(3, 1, 1)
    image = torch.where(mask, lesion, skin) + 0.03 * torch.randn(3, size, size, generator=g)
    return image.clamp(0, 1)[None], mask[None]


@pytest.fixture(scope="module")
def scorer() -> StyleDistance:
    return StyleDistance()


def test_ssim_is_one_for_identical_images_and_low_for_unrelated_ones():
    image, _ = _disk_phantom()
    noise = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    lum = luminance(image)
    assert ssim(lum, lum).item() == pytest.approx(1.0)
    assert ssim(luminance(noise), lum).item() < 0.2


def test_otsu_outline_finds_a_dark_lesion():
    image, mask = _disk_phantom()
    assert 0.2 < otsu_threshold(luminance(image)).item() < 0.7
    assert mask_iou(lesion_outline(image), mask).item() > 0.95


def test_mean_abs_change_is_in_0_255_units():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1] += 10 / 255
    torch.testing.assert_close(mean_abs_change(b, a), torch.tensor([0.0, 10.0], dtype=torch.float64))


def test_style_distance_is_zero_to_itself_and_seeded(scorer):
    image, _ = _disk_phantom()
    other = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    assert scorer(image, image).item() == pytest.approx(0.0, abs=1e-6)
    assert scorer(image, other).item() > 0.1
    assert StyleDistance()(image, other).item() == pytest.approx(scorer(image, other).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("reduction", "structure", "expected"),
    [
        (0.5, 0.9, "ok"),
        (0.02, 0.9, "unchanged"),
        (0.5, 0.05, "content_lost"),
        (0.0, float("nan"), "content_lost"),
    ],
)
def test_verdict_names_what_went_wrong(reduction, structure, expected):
    assert verdict(reduction, structure, QualityGate(min_style_reduction=0.1, min_structure=0.2)) == expected


def test_bad_gate_thresholds_are_refused():
    with pytest.raises(StdaError, match="min_structure"):
        QualityGate(min_structure=1.5)


def test_gate_catches_a_no_op_and_a_wipe(scorer):
    content, mask = _disk_phantom()
    style = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(3)) ** 2
    (no_op,) = assess(content, style, content.clone(), scorer, mask=mask)
    assert no_op.verdict == "unchanged" and no_op.style_reduction == pytest.approx(0.0, abs=1e-6)
    assert no_op.lesion_kept == pytest.approx(1.0) and no_op.mean_abs_change == 0.0
    (wiped,) = assess(content, style, style.clone(), scorer, mask=mask)
    assert wiped.verdict == "content_lost" and wiped.style_reduction == pytest.approx(1.0, abs=1e-6)


def test_record_to_dict_is_json_ready(scorer):
    content, _ = _disk_phantom()
    (record,) = assess(content, content**2, content * 0.9, scorer, terms=[{"final_style": 1.23456789}])
    line = json.loads(json.dumps(record.to_dict()))
    assert line["verdict"] in ("ok", "unchanged", "content_lost")
    assert line["mask_iou"] is None and line["terms"] == {"final_style": 1.23457}


def test_default_preset_restyles_phantoms_and_keeps_the_lesion(tmp_path, scorer):
    """The issue's bar: with random weights, every one of 8 phantom pairs passes the gate (64 px, 50 evaluations)."""
    import numpy as np
    from PIL import Image

    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.real import read_real_folder
    from stda_hf.generate.nst import NSTConfig, style_targets, stylize
    from stda_hf.generate.stage import load_content
    from stda_hf.models.features import build_vgg_features

    make_phantoms(tmp_path / "real", PhantomConfig(n=40, size=64, seed=0))
    folder = read_real_folder(tmp_path / "real")
    benign = [im for im in folder.labelled if im.label == "benign"][:8]
    malignant = [im for im in folder.labelled if im.label == "malignant"][:8]
    content = torch.stack([load_content(im.path, 64) for im in benign])
    style = torch.stack([load_content(im.path, 64) for im in malignant])
    mask = torch.stack([torch.from_numpy(np.asarray(Image.open(im.mask_path)) > 127) for im in benign])
    cfg = NSTConfig(iterations=50, precision="fp32")
    features = build_vgg_features(cfg.arch, cfg.layers(), cfg.pooling, weights="random")
    result = stylize(features, content, style_targets(features, style, cfg), cfg)
    records = assess(content, style, result.images, scorer, mask=mask)
    gate = QualityGate()
    assert all(r.style_reduction >= gate.min_style_reduction for r in records), records
    assert all(r.structure >= gate.min_structure for r in records), records
    assert [r.verdict for r in records] == ["ok"] * 8
