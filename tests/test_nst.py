"""The style-transfer engine: losses, the per-image batched optimisers, style-target caching, presets, features."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from stda_hf.core.errors import StdaError
from stda_hf.generate.nst import (
    GramCache,
    NSTConfig,
    gram,
    luminance3,
    objective,
    rgb_to_ycbcr,
    stack_targets,
    style_targets,
    stylize,
    ycbcr_to_rgb,
)
from stda_hf.generate.nst.optimizers import BatchedLBFGS
from stda_hf.models.features import build_vgg_features, conv_layer_names

SMALL = {"content_layer": "conv3_1", "style_layers": ("conv1_1", "conv2_1", "conv3_1"), "precision": "fp32"}


@pytest.fixture(scope="module")
def small_cfg() -> NSTConfig:
    return NSTConfig(iterations=5, **SMALL)


@pytest.fixture(scope="module")
def features(small_cfg):
    return build_vgg_features(small_cfg.arch, small_cfg.layers(), weights="random", seed=0)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    content = torch.rand(3, 3, 24, 24, generator=g)
    style = torch.rand(3, 3, 24, 24, generator=g) ** 2  # darker, different statistics
    return content, style


def _initial_total(features, content, targets, cfg) -> torch.Tensor:
    with torch.no_grad():
        target = features(content)[cfg.content_layer]
        return objective(features, content.clone(), target, targets, cfg).total


def test_gram_is_shifted_outer_product_over_positions():
    f = torch.randn(2, 4, 3, 5)
    flat = f.reshape(2, 4, 15) - 1.0
    expected = flat @ flat.transpose(1, 2) / (4 * 15)
    torch.testing.assert_close(gram(f, shift=-1.0), expected)


def test_gram_is_fp32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = torch.nn.functional.conv2d(torch.rand(1, 3, 8, 8), torch.rand(4, 3, 3, 3))
        assert f.dtype == torch.bfloat16
        assert gram(f).dtype == torch.float32


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_stylize_lowers_the_total_loss(features, images, small_cfg, optimizer):
    content, style = images
    cfg = dataclasses.replace(small_cfg, optimizer=optimizer, lr=None)
    targets = style_targets(features, style, cfg)
    before = _initial_total(features, content, targets, cfg)
    result = stylize(features, content, targets, cfg)
    assert result.finite.all()
    assert (result.total_loss < 0.8 * before).all(), (before, result.total_loss)
    assert result.images.shape == content.shape
    assert 0 <= result.images.min() and result.images.max() <= 1


def _float64(features, images):
    """Float64 copies of the model and two 16 px images: exact enough to compare optimiser trajectories."""
    return features.double(), *(t[:2, :, :16, :16].double() for t in images)


def _quadratic_run(scales: list[float], evaluations: int, restart: int = 0) -> tuple[torch.Tensor, ...]:
    """BatchedLBFGS on ``scale * (x^T A x / 2 - b^T x)`` per image (one ill-conditioned A, b); final x and A^-1 b."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, 3, 20, dtype=torch.float64)) @ q.T
    b = torch.randn(20, generator=g, dtype=torch.float64)
    scale = torch.tensor(scales, dtype=torch.float64)[:, None]
    x = torch.zeros(len(scales), 20, dtype=torch.float64)
    opt = BatchedLBFGS(x, history=10, restart=restart)
    for _ in range(evaluations):
        loss = scale[:, 0] * (0.5 * ((x @ a) * x).sum(1) - x @ b)
        opt.step(x, loss, scale * (x @ a - b), torch.ones(len(scales), dtype=torch.bool))
    return opt.best, torch.linalg.solve(a, b), opt.evaluations


def test_lbfgs_finds_the_minimum_of_an_ill_conditioned_quadratic():
    x, solution, _ = _quadratic_run([1.0], 200)
    torch.testing.assert_close(x[0], solution, rtol=1e-5, atol=1e-6)


def test_lbfgs_path_does_not_depend_on_the_scale_of_the_loss():
    x, solution, evaluations = _quadratic_run([1e-9, 1.0, 1e9], 25)
    assert (x[0] - solution).norm() < 0.5 * solution.norm()  # it moved well towards the minimum
    torch.testing.assert_close(x[0], x[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x[2], x[1], rtol=1e-9, atol=1e-12)
    assert len(set(evaluations.tolist())) == 1


def test_lbfgs_with_restarts_still_converges():
    x, solution, _ = _quadratic_run([1.0], 400, restart=20)
    torch.testing.assert_close(x[0], solution, rtol=1e-4, atol=1e-5)


def test_lbfgs_restarts_instead_of_stopping_when_stale_curvature_makes_a_tiny_step():
    """On ``(1e10 x0^2 + |x1 - c|^2) / 2`` the first pair holds the steep axis's curvature, so the next L-BFGS
    step along the flat axes is ~1e-10 long and lowers the loss by almost nothing: that is not convergence."""
    c = torch.tensor([[0.0, 3.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([1e10, 1.0, 1.0], dtype=torch.float64)
    x = torch.tensor([[1e-3, 0.0, 0.0]], dtype=torch.float64)
    opt = BatchedLBFGS(x, history=10)
    for _ in range(60):
        opt.step(x, 0.5 * (w * (x - c) ** 2).sum(1), w * (x - c), torch.ones(1, dtype=torch.bool))
    torch.testing.assert_close(opt.best, c, rtol=0, atol=1e-4)  # it used to stop at loss 6.5, x = 0
    assert opt.f.item() < 1e-9


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "transposed"])
def test_stylize_takes_content_in_any_memory_layout(features, images, small_cfg, layout):
    content, style = images
    strided = {
        "channels_last": content.contiguous(memory_format=torch.channels_last),
        "permuted": content.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "transposed": content.transpose(2, 3).contiguous().transpose(2, 3),
    }[layout]
    assert not strided.is_contiguous()
    targets = style_targets(features, style, small_cfg)
    expected = stylize(features, content, targets, small_cfg)
    torch.testing.assert_close(stylize(features, strided, targets, small_cfg).images, expected.images)


class _Scaled(torch.nn.Module):
    """The feature extractor with every activation multiplied by ``scale``."""

    def __init__(self, inner, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale
        self.input_space = inner.input_space

    def forward(self, x):
        return {k: v * self.scale for k, v in self.inner(x).items()}

    def activations(self, h):
        return {k: v * self.scale for k, v in self.inner.activations(h).items()}


@pytest.mark.parametrize("preset", ["default", "original"])
def test_each_preset_lowers_every_loss_by_the_same_fraction_at_any_feature_scale(features, images, preset):
    """Features x 1e-3 and x 1e3 (Gram terms, content terms and the Gram shift rescaled with them, so that the
    objective is the same function times s^2 and only its scale changes): same fractions, same evaluations, the
    same line-search trials rejected (lr=2 doubles the quasi-Newton step, so some trials must be shrunk)."""
    content, style = (t[:2, :, :32, :32] for t in images)
    net = build_vgg_features("vgg16", conv_layer_names("vgg16")[:7], weights="random", seed=0)
    base = NSTConfig(
        preset=preset,
        content_layer="conv3_1",
        style_layers=tuple(conv_layer_names("vgg16")[:7]),
        iterations=15,
        precision="fp32",
        lr=2.0,
    )
    if preset == "default":
        base = dataclasses.replace(base, arch="vgg16")
    runs = {}
    for s in (1.0, 1e-3, 1e3):
        cfg = dataclasses.replace(
            base,
            style_weight=base.style_weight / s**2,  # Gram terms scale as s^4, content terms as s^2
            tv_weight=base.tv_weight * s**2,
            gram_shift=base.gram_shift * s,  # (sF - s) = s (F - 1)
        )
        f = _Scaled(net, s)
        result = stylize(f, content, style_targets(f, style, cfg), cfg)
        runs[s] = (1 - result.total_loss / result.initial_total_loss, result.evaluations, result.rejected)
    fraction, evaluations, rejected = runs[1.0]
    assert (fraction > 0.05).all(), fraction
    assert (rejected > 0).all(), rejected  # the line search shrank steps: its acceptance test is exercised
    for s in (1e-3, 1e3):
        torch.testing.assert_close(runs[s][0], fraction, rtol=0.05, atol=0)
        assert runs[s][1].tolist() == evaluations.tolist()
        assert runs[s][2].tolist() == rejected.tolist()


def test_image_result_does_not_depend_on_its_batch(features, images, small_cfg):
    f, content, style = _float64(copy.deepcopy(features), images)
    targets = style_targets(f, style, small_cfg)
    batch = stylize(f, content, targets, small_cfg)
    alone = stylize(f, content[1:], {k: v[1:] for k, v in targets.items()}, small_cfg)
    torch.testing.assert_close(alone.images[0], batch.images[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(alone.total_loss[0], batch.total_loss[1], atol=1e-12, rtol=1e-9)


def test_fp32_image_alone_and_in_batch_agree_to_an_8_bit_level(features, images, small_cfg):
    content, style = images
    targets = style_targets(features, style, small_cfg)
    batch = stylize(features, content, targets, small_cfg)
    alone = stylize(features, content[1:2], {k: v[1:2] for k, v in targets.items()}, small_cfg)
    torch.testing.assert_close(alone.images[0], batch.images[1], atol=1 / 255, rtol=0)


def test_noise_init_is_seeded_per_image(features, images, small_cfg):
    content, style = images
    cfg = dataclasses.replace(small_cfg, init="noise", iterations=2)
    targets = style_targets(features, style, cfg)
    a = stylize(features, content[:2], {k: v[:2] for k, v in targets.items()}, cfg, seeds=[7, 8]).images
    b = stylize(features, content[1:2], {k: v[1:2] for k, v in targets.items()}, cfg, seeds=[8]).images
    torch.testing.assert_close(a[1], b[0], atol=1e-4, rtol=0)
    assert (a[0] - a[1]).abs().mean() > 0.05


def test_cached_style_targets_equal_uncached_and_are_computed_once(features, images, small_cfg):
    _, style = images
    direct = style_targets(features, style, small_cfg)
    cache, calls = GramCache(max_items=8), []

    def compute(keys):
        calls.append(list(keys))
        grams = style_targets(features, style[list(keys)], small_cfg)
        return [{k: v[i] for k, v in grams.items()} for i in range(len(keys))]

    first = stack_targets(cache.get_many([2, 0, 2], compute))
    again = stack_targets(cache.get_many([0, 2, 1], compute))
    assert calls == [[2, 0], [1]]
    assert cache.computed == 3
    for layer in small_cfg.style_layers:
        torch.testing.assert_close(first[layer], direct[layer][[2, 0, 2]], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(again[layer], direct[layer][[0, 2, 1]], atol=1e-6, rtol=1e-5)


def test_gram_cache_evicts_least_recently_used():
    cache = GramCache(max_items=2)
    value = {"conv1_1": torch.zeros(1)}
    cache.get_many(["a", "b"], lambda keys: [value] * len(keys))
    cache.get_many(["a", "c"], lambda keys: [value] * len(keys))
    assert "a" in cache and "c" in cache and "b" not in cache


def test_non_finite_image_is_flagged_and_others_are_unaffected(features, images, small_cfg):
    content, style = images
    targets = style_targets(features, style, small_cfg)
    clean = stylize(features, content, targets, small_cfg)
    poisoned = {k: v.clone() for k, v in targets.items()}
    poisoned["conv2_1"][1] = float("nan")
    result = stylize(features, content, poisoned, small_cfg)
    assert result.finite.tolist() == [True, False, True]
    torch.testing.assert_close(result.images[[0, 2]], clean.images[[0, 2]], atol=1e-4, rtol=0)


def test_image_that_goes_non_finite_in_bf16_is_redone_in_fp32(features, images, small_cfg, monkeypatch):
    content, style = images
    targets = style_targets(features, style, small_cfg)
    alone = stylize(features, content[1:2], {k: v[1:2] for k, v in targets.items()}, small_cfg)
    forward = type(features).forward

    def overflow_second_image_in_bf16(self, x):
        out = forward(self, x)
        if torch.is_autocast_enabled("cpu"):
            out = {
                k: torch.cat([v[:1], torch.full_like(v[1:2], float("inf")), v[2:]]) for k, v in out.items()
            }
        return out

    monkeypatch.setattr(type(features), "forward", overflow_second_image_in_bf16)
    result = stylize(features, content, targets, dataclasses.replace(small_cfg, precision="bf16"))
    assert result.finite.all() and result.redone[1]
    torch.testing.assert_close(result.images[1], alone.images[0], atol=1 / 255, rtol=0)


def test_image_whose_loss_rises_in_bf16_is_redone_in_fp32(features, images, small_cfg):
    content, style = images
    cfg = dataclasses.replace(small_cfg, optimizer="adam", lr=0.5, iterations=3)  # steps far too large
    targets = style_targets(features, style, cfg)
    fp32 = stylize(features, content, targets, cfg)
    bf16 = stylize(features, content, targets, dataclasses.replace(cfg, precision="bf16"))
    assert bf16.redone.all() and not fp32.redone.any()
    torch.testing.assert_close(bf16.images, fp32.images)


def test_bf16_autocast_runs_and_stays_close_to_fp32(features, images, small_cfg):
    content, style = images
    targets = style_targets(features, style, small_cfg)
    fp32 = stylize(features, content, targets, small_cfg)
    bf16 = stylize(features, content, targets, dataclasses.replace(small_cfg, precision="bf16"))
    assert bf16.finite.all()
    assert ((bf16.total_loss - fp32.total_loss).abs() / fp32.total_loss).max() < 0.25


def test_ycbcr_colour_preservation_keeps_content_chroma(features, images, small_cfg):
    content, style = images
    cfg = dataclasses.replace(small_cfg, preserve_color="ycbcr", iterations=3)
    targets = style_targets(features, style, cfg)
    plain = stylize(features, content, targets, dataclasses.replace(cfg, preserve_color="none"))
    kept = stylize(features, content, targets, cfg)
    chroma = rgb_to_ycbcr(content)[:, 1:]
    torch.testing.assert_close(ycbcr_to_rgb(rgb_to_ycbcr(content)), content, atol=1e-4, rtol=0)
    assert (rgb_to_ycbcr(kept.images)[:, 1:] - chroma).abs().mean() < 0.01
    assert (rgb_to_ycbcr(plain.images)[:, 1:] - chroma).abs().mean() > 0.02


def test_luminance_mode_transfers_gray_style_and_keeps_content_chroma(features, images, small_cfg):
    content, style = images
    cfg = dataclasses.replace(small_cfg, preserve_color="luminance", iterations=3)
    targets = style_targets(features, style, cfg)
    gray = style_targets(features, luminance3(style), small_cfg)
    for layer in cfg.style_layers:
        torch.testing.assert_close(targets[layer], gray[layer])
    result = stylize(features, content, targets, cfg)
    assert (rgb_to_ycbcr(result.images)[:, 1:] - rgb_to_ycbcr(content)[:, 1:]).abs().mean() < 0.02


def test_original_preset_has_inetworks_settings():
    cfg = NSTConfig(preset="original")
    assert (cfg.arch, cfg.content_layer, cfg.pooling, cfg.init) == ("vgg16", "conv5_2", "max", "content")
    assert (cfg.content_weight, cfg.style_weight, cfg.tv_weight, cfg.gram_shift) == (0.025, 1.0, 8.5e-5, -1.0)
    assert (cfg.objective, cfg.history, cfg.restart, cfg.clamp) == ("inetwork", 10, 20, False)
    assert cfg.style_layers == tuple(conv_layer_names("vgg16")) and len(cfg.style_layers) == 13


def test_inetwork_layer_weights_are_its_adjacent_differences():
    weights = list(NSTConfig(preset="original").style_layer_weights().values())
    assert weights == [2.0**-11] + [2.0 ** (k - 12) for k in range(1, 12)] + [-1.0]


def test_explicit_settings_override_the_preset():
    cfg = NSTConfig(preset="original", content_layer="conv4_2", pooling="avg", layer_weights="uniform")
    assert (cfg.arch, cfg.content_layer, cfg.pooling) == ("vgg16", "conv4_2", "avg")
    assert set(cfg.style_layer_weights().values()) == {1.0}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"preset": "fancy"}, "fancy"),
        ({"content_layer": "conv6_1"}, "conv6_1"),
        ({"arch": "vgg16", "style_layers": ("conv3_4",)}, "conv3_4"),
        ({"optimizer": "sgd"}, "sgd"),
        ({"layer_weights": "1,2"}, "1,2"),
        ({"init": "white"}, "white"),
        ({"iterations": 0}, "--iterations"),
        ({"preserve_color": "yes"}, "yes"),
    ],
)
def test_bad_settings_raise_an_error_naming_the_value(settings, named):
    with pytest.raises(StdaError, match=r"valid|must|give one of") as err:
        NSTConfig(**settings)
    assert named in str(err.value)


def test_features_equal_torchvision_vgg_with_the_same_weights(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    reference = make_layers(cfgs["D"]).eval()  # torchvision's VGG16 ``features``
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "vgg16.safetensors"))
    ours = build_vgg_features("vgg16", ("conv2_1", "conv3_2"), weights=str(tmp_path / "vgg16.safetensors"))
    assert len(ours.features) == 14  # conv/relu x2, pool, conv/relu x2, pool, conv/relu x2: cut after relu3_2
    x = torch.rand(1, 3, 32, 32)
    normalised = (x - ours.mean) / ours.std
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out["conv2_1"], reference[:7](normalised))
        torch.testing.assert_close(out["conv3_2"], reference[:14](normalised))


def test_random_weights_are_seeded(small_cfg):
    a = build_vgg_features("vgg19", ("conv1_1",), weights="random", seed=3)
    b = build_vgg_features("vgg19", ("conv1_1",), weights="random", seed=3)
    c = build_vgg_features("vgg19", ("conv1_1",), weights="random", seed=4)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_imagenet_weights_offline_name_both_ways_out(monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(StdaError) as err:
        build_vgg_features("vgg19", ("conv4_2",), weights="imagenet")
    assert "--weights PATH" in str(err.value) and "--weights random" in str(err.value)


def test_lbfgs_stops_an_image_whose_gradient_vanishes():
    x = torch.ones(2, 3)
    opt = BatchedLBFGS(x, history=4)
    grad = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    opt.step(x, torch.tensor([1.0, 1.0]), grad, torch.tensor([True, True]))
    assert opt.active.tolist() == [True, False]
    assert torch.equal(x[1], torch.ones(3)) and not torch.equal(x[0], torch.ones(3))


def test_auto_precision_is_fp32_on_cpu_and_explicit_values_are_kept():
    from stda_hf.generate.nst import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


def _inetwork_reference(net, rgb, content, style, layers, content_layer):
    """INetwork.py's loss written out as the script does it (float64), for a few layers: value and RGB gradient."""
    mean = torch.tensor([103.939, 116.779, 123.68], dtype=torch.float64).view(1, 3, 1, 1)
    x = rgb.clone().requires_grad_(True)
    batch = torch.cat([content, style, x])[:, [2, 1, 0]] * 255.0 - mean  # base, style, combination
    acts = net.activations(batch)
    rows, cols = rgb.shape[-2:]

    def gram(f):
        f = f.reshape(f.shape[0], -1) - 1
        return f @ f.T

    def style_loss(s, c):
        return ((gram(s) - gram(c)) ** 2).sum() / (4.0 * 3**2 * (rows * cols) ** 2)

    content_term = 0.025 * ((acts[content_layer][2] - acts[content_layer][0]) ** 2).sum()
    style_term, nb_layers = 0.0, len(layers) - 1
    for i in range(len(layers) - 1):
        sl1 = style_loss(acts[layers[i]][1], acts[layers[i]][2])
        sl2 = style_loss(acts[layers[i + 1]][1], acts[layers[i + 1]][2])
        style_term = style_term + 1.0 / (2 ** (nb_layers - (i + 1))) * (sl1 - sl2)
    z = batch[2:]
    a = (z[:, :, : rows - 1, : cols - 1] - z[:, :, 1:, : cols - 1]) ** 2
    b = (z[:, :, : rows - 1, : cols - 1] - z[:, :, : rows - 1, 1:]) ** 2
    tv_term = 8.5e-5 * ((a + b) ** 1.25).sum()
    total = content_term + style_term + tv_term
    (grad,) = torch.autograd.grad(total, x)
    return {"content": content_term, "style": style_term, "tv": tv_term, "total": total}, grad


def test_original_terms_and_gradient_equal_inetworks_in_float64():
    from stda_hf.generate.nst import loss_terms
    from stda_hf.models.features import to_caffe

    layers = tuple(conv_layer_names("vgg16")[:5])
    cfg = NSTConfig(preset="original", content_layer="conv2_2", style_layers=layers)
    net = build_vgg_features("vgg16", layers, weights="random", seed=1).double()
    net.input_space = "caffe"  # random weights in the convention of INetwork's Keras weights
    g = torch.Generator().manual_seed(3)
    content, style = (torch.rand(1, 3, 20, 28, generator=g, dtype=torch.float64) for _ in range(2))
    image = (content + 0.1 * torch.randn(1, 3, 20, 28, generator=g, dtype=torch.float64)).clamp(0, 1)
    expected, expected_grad = _inetwork_reference(net, image, content, style, layers, "conv2_2")
    ours = loss_terms(net, image, content, style, cfg)
    for name, value in expected.items():
        torch.testing.assert_close(ours.terms[name][0], value.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(ours.grads["total"], expected_grad, rtol=1e-9, atol=1e-12)
    script = loss_terms(net, to_caffe(image), to_caffe(content), to_caffe(style), cfg, space="script")
    torch.testing.assert_close(script.terms["total"], ours.terms["total"], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        script.grads["total"].flip(1) * 255.0, ours.grads["total"], rtol=1e-9, atol=1e-12
    )
    at_start = loss_terms(net, content, content, style, cfg)
    assert at_start.terms["content"].item() == 0.0


def test_original_preset_changes_the_image_at_64_px():
    layers = tuple(conv_layer_names("vgg16"))
    cfg = NSTConfig(preset="original", iterations=20, precision="fp32")
    net = build_vgg_features("vgg16", layers, weights="random", seed=0)
    g = torch.Generator().manual_seed(0)
    content = torch.rand(1, 3, 64, 64, generator=g)
    style = torch.rand(1, 3, 64, 64, generator=g) ** 2
    result = stylize(net, content, style_targets(net, style, cfg), cfg)
    assert (result.total_loss < 0.9 * result.initial_total_loss).all()
    assert (result.images - content).abs().mean() * 255 > 2.0


def test_schedule_runs_half_size_first_and_ends_bf16_in_fp32():
    from stda_hf.generate.nst import schedule

    cfg = NSTConfig(iterations=40, coarse_to_fine=0.5, fp32_finish=0.25)
    stages = schedule(cfg, "bf16", (128, 128))
    assert [s.scale for s in stages] == [0.5, 1.0]
    assert stages[0].precisions == ("bf16",) * 20
    assert stages[1].precisions == ("bf16",) * 10 + ("fp32",) * 10
    assert [s.precisions for s in schedule(cfg, "fp32", (48, 48))] == [("fp32",) * 40]  # too small to halve
    short = dataclasses.replace(cfg, iterations=2, coarse_to_fine=0.75)
    assert [(s.scale, len(s.precisions)) for s in schedule(short, "fp32", (128, 128))] == [(0.5, 1), (1.0, 1)]


def test_coarse_to_fine_lowers_the_loss_and_keeps_images_independent_of_their_batch(features):
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 16, 16, generator=g), size=128, mode="bilinear")
    content, style = smooth[:2], smooth[2:] ** 2  # images with little pixel-level detail, as photos have
    cfg = NSTConfig(iterations=8, **{**SMALL, "precision": "fp32"}, coarse_to_fine=0.5)
    targets = style_targets(features, style, cfg)
    assert targets["coarse/conv1_1"].shape == targets["conv1_1"].shape
    assert not torch.equal(targets["coarse/conv1_1"], targets["conv1_1"])  # the style at half size
    batch = stylize(features, content, targets, cfg)
    alone = stylize(features, content[1:], {k: v[1:] for k, v in targets.items()}, cfg)
    assert (batch.total_loss < 0.5 * batch.initial_total_loss).all()
    assert batch.evaluations.tolist() == [8, 8]
    torch.testing.assert_close(alone.images[0], batch.images[1], atol=1 / 255, rtol=0)


def test_coarse_stage_shows_in_the_callback_at_half_size(features):
    g = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, 128, 128, generator=g), torch.rand(1, 3, 128, 128, generator=g)
    cfg = NSTConfig(iterations=4, **SMALL, coarse_to_fine=0.5)
    sizes = []
    stylize(
        features,
        content,
        style_targets(features, style, cfg),
        cfg,
        callback=lambda x: sizes.append(x.shape[-1]),
    )
    assert sizes == [64, 64, 128, 128]


def test_channels_last_gives_the_same_images_to_an_8_bit_level(features, images, small_cfg):
    content, style = images
    targets = style_targets(features, style, small_cfg)
    plain = stylize(features, content, targets, small_cfg)
    nhwc = stylize(features, content, targets, dataclasses.replace(small_cfg, channels_last=True))
    torch.testing.assert_close(nhwc.images, plain.images, atol=1 / 255, rtol=0)


def test_bf16_with_fp32_finish_is_deterministic(features, images, small_cfg):
    content, style = images
    cfg = dataclasses.replace(small_cfg, precision="bf16", iterations=8, fp32_finish=0.5)
    targets = style_targets(features, style, cfg)
    a, b = stylize(features, content, targets, cfg), stylize(features, content, targets, cfg)
    assert torch.equal(a.images, b.images)


def test_original_preset_feeds_each_network_its_own_input_convention():
    """INetwork's objective works in Caffe units; a torchvision-convention network gets them back as normalised
    RGB, a Caffe-trained one (vgg19-imagenet, Keras .h5) gets them as they are."""
    from stda_hf.generate.nst import activations
    from stda_hf.models.features import to_caffe

    cfg = NSTConfig(preset="original", content_layer="conv1_2", style_layers=("conv1_1",))
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    torchvision_net = build_vgg_features("vgg16", ("conv1_2",), weights="random", seed=0).double()
    caffe_net = copy.deepcopy(torchvision_net)
    caffe_net.input_space = "caffe"
    with torch.no_grad():
        torch.testing.assert_close(
            activations(torchvision_net, to_caffe(x), cfg)["conv1_2"], torchvision_net(x)["conv1_2"]
        )
        torch.testing.assert_close(
            activations(caffe_net, to_caffe(x), cfg)["conv1_2"], caffe_net.activations(to_caffe(x))["conv1_2"]
        )
