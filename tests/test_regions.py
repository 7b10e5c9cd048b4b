"""Region-aware style transfer (``stda generate --regions``): masked Gram matrices, the style's perilesional skin,
the engines' use of them, the gate's lesion measure, and the stage's choice and record of the mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stda_hf.cli import main
from stda_hf.core.errors import StdaError
from stda_hf.generate.engines import ArbitraryEngine, GatysEngine
from stda_hf.generate.nst import NSTConfig, gram, layer_masks, masked_gram, region_key, style_targets
from stda_hf.generate.quality import StyleDistance, assess
from stda_hf.generate.regions import (
    DARK,
    content_regions,
    feather,
    fill_outside,
    gate_weights,
    pair_mode,
    perilesional_skin,
    style_regions,
)
from stda_hf.generate.stage import GenerateConfig, generate
from stda_hf.models.features import build_vgg_features
from stda_hf.models.weights import parse_weights

LAYERS = {"content_layer": "conv2_1", "style_layers": ("conv1_1", "conv2_1")}


def _disk(size: int, radius: float, centre: tuple[float, float] | None = None) -> torch.Tensor:
    cy, cx = centre or ((size - 1) / 2, (size - 1) / 2)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _skin_with_lesion(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured skin-coloured image with a dark textured lesion in the middle, and its mask."""
    g = torch.Generator().manual_seed(seed)
    image = torch.tensor([0.85, 0.65, 0.55])[:, None, None] + 0.05 * torch.rand(3, size, size, generator=g)
    mask = _disk(size, size / 5)
    lesion = torch.tensor([0.35, 0.2, 0.15])[:, None, None] + 0.1 * torch.rand(3, size, size, generator=g)
    return torch.where(mask[None], lesion, image).clamp(0, 1), mask


# ----------------------------------------------------------------------------------------------------------------
# Masked Gram matrices


def test_masked_gram_of_a_mask_of_ones_is_the_gram_matrix():
    acts = torch.randn(2, 5, 6, 7)
    ones = torch.ones(2, 1, 6, 7)
    assert torch.allclose(masked_gram(acts, ones)[:, 0], gram(acts), atol=1e-6)
    assert torch.allclose(
        masked_gram(acts, ones, normalise=False)[:, 0], gram(acts, normalise=False), atol=1e-4
    )


def test_masked_gram_ignores_activations_outside_the_region():
    acts = torch.randn(1, 4, 8, 8)
    region = torch.zeros(1, 1, 8, 8)
    region[..., 2:5, 2:5] = 1.0
    changed = acts.clone()
    changed[..., 6:, :] += 10.0  # only outside the region
    assert torch.equal(masked_gram(acts, region), masked_gram(changed, region))
    assert not torch.equal(gram(acts), gram(changed))


def test_masked_gram_is_the_regions_own_statistics_whatever_its_size():
    """Normalised by the region's mass: a region of a constant texture has that texture's Gram matrix."""
    patch = torch.randn(1, 3, 4, 4)
    big = patch.repeat(1, 1, 4, 4)  # 16 x 16 of the same tiles
    region = torch.zeros(1, 1, 16, 16)
    region[..., :8, :8] = 1.0  # four whole tiles
    assert torch.allclose(masked_gram(big, region)[:, 0], gram(patch), atol=1e-6)


def test_layer_masks_are_the_share_of_each_cell_inside_the_region():
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :1] = 1.0
    assert layer_masks(region, (2, 2))[0, 0].tolist() == [[0.5, 0.0], [0.0, 0.0]]


# ----------------------------------------------------------------------------------------------------------------
# Regions of the content and of the style


def test_perilesional_skin_is_a_ring_round_the_lesion_without_the_frame_corners():
    mask = _disk(64, 8).numpy()
    ring = perilesional_skin(mask)
    assert not (ring & mask).any()
    assert ring[32, 32 + 12] and ring[32 - 12, 32]  # 12 px from the centre: in the ring (radius 8 + 8)
    assert not ring[:8, :8].any() and not ring[-8:, -8:].any()  # corners: where vignettes and rulers sit
    assert not ring[32, 32 + 20]  # beyond one equivalent radius of the border


def test_perilesional_skin_leaves_out_near_black_pixels():
    mask = _disk(32, 5).numpy()
    image = np.full((32, 32, 3), 0.7)
    image[16, 16 + 8] = DARK / 2  # an ink dot in the ring
    assert perilesional_skin(mask)[16, 24] and not perilesional_skin(mask, image)[16, 24]


def test_style_regions_are_lesion_and_perilesional_skin_and_content_regions_lesion_and_the_rest():
    image, mask = _skin_with_lesion()
    style = style_regions(image, mask)
    content = content_regions(mask)
    assert torch.equal(style[0].bool(), mask) and torch.equal(content[0].bool(), mask)
    assert torch.equal(content[1].bool(), ~mask)
    assert style[1].sum() < content[1].sum() and not (style[1].bool() & mask).any()


@pytest.mark.parametrize(
    ("mode", "content", "style", "expected"),
    [
        ("auto", True, True, "lesion-skin"),
        ("auto", True, False, "none"),
        ("auto", False, True, "none"),
        ("lesion-skin", True, False, "none"),
        ("lesion", True, True, "lesion"),
        ("lesion", True, False, "none"),
        ("none", True, True, "none"),
    ],
)
def test_pair_mode_needs_the_masks_its_mode_uses(mode, content, style, expected):
    assert pair_mode(mode, content, style) == expected


def test_an_unknown_region_mode_names_the_value_and_the_choices():
    with pytest.raises(StdaError, match=r"--regions 'skin'.*lesion-skin"):
        GenerateConfig(regions="skin", weights="random")


def test_fill_outside_keeps_the_regions_pixels_and_fills_the_rest_with_their_mean():
    image, mask = _skin_with_lesion()
    filled = fill_outside(image, mask.float())
    assert torch.equal(filled[:, mask], image[:, mask])
    assert torch.allclose(filled[:, ~mask], image[:, mask].mean(1)[:, None].expand(-1, int((~mask).sum())))


def test_feather_is_one_inside_zero_far_outside_and_between_at_the_border():
    m = feather(_disk(64, 12))[0]
    assert m[32, 32] > 0.99 and m[0, 0] < 0.01 and 0.2 < m[32, 32 + 12] < 0.8


# ----------------------------------------------------------------------------------------------------------------
# Style targets and the engines


def test_style_artifacts_outside_the_styles_regions_do_not_enter_its_region_targets():
    """A ruler in the style's frame corner changes its whole-frame Gram matrix, not its region targets (conv1_1:
    a 3 x 3 receptive field, far from the ring)."""
    features = build_vgg_features("vgg19", ("conv1_1", "conv2_1"), weights="random", seed=0)
    cfg = NSTConfig(**LAYERS)
    image, mask = _skin_with_lesion(64)
    regions = style_regions(image, mask)[None]
    ruled = image.clone()
    ruled[:, :4, ::3] = 0.0  # ruler ticks along the top edge
    plain, ruler = (style_targets(features, x[None], cfg, regions) for x in (image, ruled))
    key = region_key("conv1_1")
    assert torch.equal(plain[key], ruler[key])
    assert not torch.allclose(plain["conv1_1"], ruler["conv1_1"])


def _gatys(regions: bool) -> GatysEngine:
    cfg = NSTConfig(iterations=6, precision="fp32", **LAYERS)
    return GatysEngine(cfg, parse_weights("random", seed=0), torch.device("cpu"), 32, regions=regions)


def test_gatys_lesion_mode_starts_with_no_style_loss_in_the_skin():
    """``lesion``: the skin's targets are the content's own skin statistics, so from the content the only style
    loss is the lesion's; with the style's skin it is larger."""
    content, c_mask = _skin_with_lesion(32, seed=1)
    style, s_mask = _skin_with_lesion(32, seed=2)
    style = style.flip(0)  # other colours
    engine = _gatys(regions=True)
    state = {k: v[None] for k, v in engine.style_state(style, s_mask).items()}
    losses = {}
    for mode in ("lesion", "lesion-skin"):
        out = engine.run(content[None], state, [0], [mode], [c_mask])
        losses[mode] = out.terms[0]["initial_style"]
    assert losses["lesion"] < losses["lesion-skin"]


def test_gatys_rows_without_regions_in_a_regional_batch_are_the_whole_frame_result():
    content, c_mask = _skin_with_lesion(32, seed=1)
    style, s_mask = _skin_with_lesion(32, seed=2)
    whole = _gatys(regions=False)
    regional = _gatys(regions=True)
    plain = whole.run(content[None], {k: v[None] for k, v in whole.style_state(style).items()}, [0])
    state = {k: v[None] for k, v in regional.style_state(style, s_mask).items()}
    mixed = regional.run(content[None], state, [0], ["none"], [c_mask])
    torch.testing.assert_close(mixed.images, plain.images, atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def arbitrary_engines():
    pytest.importorskip("onnxruntime")
    from stda_hf.generate.arbitrary import ArbitraryConfig

    cfg = ArbitraryConfig(render_size=64)
    return {r: ArbitraryEngine(cfg, torch.device("cpu"), regions=r) for r in (False, True)}


def test_arbitrary_lesion_mode_leaves_the_skin_away_from_the_lesion_as_it_was(arbitrary_engines):
    content, c_mask = _skin_with_lesion(48, seed=1)
    style, s_mask = _skin_with_lesion(48, seed=2)
    engine = arbitrary_engines[True]
    state = {k: v[None] for k, v in engine.style_state(style, s_mask).items()}
    out = engine.run(content[None], state, [0], ["lesion"], [c_mask]).images[0]
    far = feather(c_mask)[0] < 1e-6
    assert torch.equal(out[:, far], content[:, far])
    assert (out[:, c_mask] - content[:, c_mask]).abs().mean() > 0.02  # the lesion was restyled


def test_arbitrary_lesion_skin_mode_uses_the_skin_style_outside_and_the_lesion_style_inside(
    arbitrary_engines,
):
    content, c_mask = _skin_with_lesion(48, seed=1)
    style, s_mask = _skin_with_lesion(48, seed=2)
    engine = arbitrary_engines[True]
    state = {k: v[None] for k, v in engine.style_state(style, s_mask).items()}
    out = engine.run(content[None], state, [0], ["lesion-skin"], [c_mask]).images[0]
    lesion_only = engine.run(content[None], state, [0], ["lesion"], [c_mask]).images[0]
    far = feather(c_mask)[0] < 1e-6
    assert not torch.equal(out[:, far], content[:, far])
    inside = feather(c_mask)[0] > 1 - 1e-6
    torch.testing.assert_close(out[:, inside], lesion_only[:, inside], atol=1e-5, rtol=0)


def test_arbitrary_rows_without_regions_are_the_whole_frame_render(arbitrary_engines):
    content, c_mask = _skin_with_lesion(48, seed=1)
    style, _ = _skin_with_lesion(48, seed=2)
    plain = arbitrary_engines[False]
    regional = arbitrary_engines[True]
    a = plain.run(content[None], {k: v[None] for k, v in plain.style_state(style).items()}, [0]).images
    state = {k: v[None] for k, v in regional.style_state(style, None).items()}
    b = regional.run(content[None], state, [0], ["none"], [c_mask]).images
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# The gate's lesion measure


def test_gate_weights_measure_the_lesion_of_regional_pairs_only():
    _, mask = _skin_with_lesion()
    present = torch.tensor([[True, True], [True, True], [False, True]])
    w = gate_weights(["lesion-skin", "none", "lesion"], [mask, mask, mask], present)
    assert w.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


@pytest.fixture(scope="module")
def scorer():
    return StyleDistance(weights="random")


def _regional_assess(scorer, content, c_mask, style, s_mask, result):
    targets = scorer.grams(style[None])
    targets.update(scorer.region_grams(style[None], style_regions(style, s_mask)[None]))
    return assess(
        content[None],
        targets,
        result[None],
        scorer,
        mask=c_mask[None],
        regions=content_regions(c_mask)[None],
        region_weights=torch.tensor([[1.0, 0.0]]),
    )[0]


def test_gate_in_regions_calls_an_unchanged_or_blurred_lesion_unchanged(scorer):
    from torchvision.transforms.v2.functional import gaussian_blur

    content, c_mask = _skin_with_lesion(64, seed=1)
    style, s_mask = _skin_with_lesion(64, seed=2)
    style = torch.where(s_mask[None], style.flip(0), style)  # a lesion of other colours
    for result in (content, gaussian_blur(content, [5, 5], [1.0, 1.0])):
        record = _regional_assess(scorer, content, c_mask, style, s_mask, result)
        assert record.style_measured == "regions"
        assert record.style_reduction < 0.25 and record.verdict != "ok"


def test_gate_in_regions_sees_the_styles_lesion_moved_into_the_content_lesion(scorer):
    content, c_mask = _skin_with_lesion(64, seed=1)
    style, s_mask = _skin_with_lesion(64, seed=2)
    style = torch.where(s_mask[None], style.flip(0), style)
    result = torch.where(c_mask[None], style, content)  # the same disk: the style's lesion pixels
    record = _regional_assess(scorer, content, c_mask, style, s_mask, result)
    assert record.style_reduction > 0.5


# ----------------------------------------------------------------------------------------------------------------
# The stage


def _generate(real, out, **kw):
    cfg = GenerateConfig(
        weights="random", size=32, per_content=1, iterations=2, limit=4, max_failed_share=1.0, **LAYERS, **kw
    )
    generate(real, out, cfg)
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_auto_resolves_to_lesion_skin_on_a_folder_with_masks_and_records_it(phantom_real, tmp_path):
    records = _generate(phantom_real, tmp_path / "syn")
    assert {r["regions"] for r in records} == {"lesion-skin"}
    assert "regions: lesion-skin" in (tmp_path / "syn" / "generate.yaml").read_text()
    assert {r["quality"]["style_measured"] for r in records} == {"regions"}
    summary = json.loads((tmp_path / "syn" / "generate_summary.json").read_text())
    assert summary["regions"] == {"lesion-skin": 4}


def test_auto_is_none_on_a_folder_without_masks(phantom_real, tmp_path):
    for mask in (phantom_real / "masks").iterdir():
        mask.unlink()
    records = _generate(phantom_real, tmp_path / "syn")
    assert {r["regions"] for r in records} == {"none"}
    assert {r["quality"]["style_measured"] for r in records} == {"whole"}


def test_a_folder_made_before_regions_existed_resumes_with_regions_none(phantom_real, tmp_path):
    out = tmp_path / "syn"
    first = _generate(phantom_real, out, regions="none")
    saved = out / "generate.yaml"
    saved.write_text(
        "\n".join(line for line in saved.read_text().splitlines() if not line.startswith("regions"))
    )
    again = _generate(phantom_real, out, regions="none")
    assert [r["id"] for r in again] == [r["id"] for r in first]
    with pytest.raises(StdaError, match="other settings"):
        _generate(phantom_real, out, regions="lesion")


def test_generate_cli_refuses_an_unknown_region_mode(phantom_real, tmp_path, capsys):
    assert main(["generate", str(phantom_real), "--out", str(tmp_path / "s"), "--regions", "sticker"]) == 2
    assert "--regions 'sticker'" in capsys.readouterr().err


def test_perilesional_skin_leaves_out_ink_coloured_pixels_but_keeps_the_skins_grain():
    mask = _disk(48, 6).numpy()
    rng = np.random.default_rng(0)
    image = np.clip(np.array([0.85, 0.65, 0.55]) + 0.03 * rng.standard_normal((48, 48, 3)), 0, 1)
    image[24, 24 + 9] = [0.5, 0.2, 0.7]  # a purple ink dot in the ring
    ring = perilesional_skin(mask, image)
    plain = perilesional_skin(mask)
    assert plain[24, 33] and not ring[24, 33]
    assert ring.sum() >= 0.97 * plain.sum()  # the grain of plain skin is not an outlier


def test_a_ruler_at_the_frame_edge_changes_no_region_target_of_the_engine_at_any_layer():
    """Region targets come from the style with everything outside the region set to the region's mean colour,
    so even the deepest layer (whose cells see most of a small frame) does not see the ruler."""
    engine = _gatys(regions=True)
    image, mask = _skin_with_lesion(32)
    ruled = image.clone()
    ruled[:, :3, ::3] = 0.0
    plain, ruler = engine.style_state(image, mask), engine.style_state(ruled, mask)
    for layer in LAYERS["style_layers"]:
        assert torch.equal(plain[region_key(layer)], ruler[region_key(layer)]), layer
        assert not torch.allclose(plain[layer], ruler[layer]), layer


def test_the_dataset_card_lists_the_region_mode_for_both_engines():
    from stda_hf.dataset.card import engine_settings

    for engine in ("gatys", "arbitrary"):
        settings = {"engine": engine, "regions": "lesion-skin", "size": 32}
        assert engine_settings(settings, engine)["regions"] == "lesion-skin"


@pytest.mark.parametrize(("regions", "hinted"), [("lesion-skin", True), ("none", False)])
def test_a_failed_region_aware_arbitrary_run_says_why_and_what_to_do(phantom_real, tmp_path, regions, hinted):
    pytest.importorskip("onnxruntime")
    from stda_hf.generate import QualityGateFailed

    cfg = GenerateConfig(
        engine="arbitrary", size=32, per_content=1, limit=2, regions=regions, min_style_reduction=0.99
    )
    with pytest.raises(QualityGateFailed) as failed:
        generate(phantom_real, tmp_path / "syn", cfg)
    assert ("--engine gatys transfers them" in str(failed.value)) is hinted
