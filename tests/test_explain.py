"""Explanations: DTD checks on a small VGG8, every method by name, hooks removed, the numbers, the stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_VGG8, tiny_train_flags
from PIL import Image
from scipy.ndimage import binary_erosion
from torch import nn

from stda_hf.attribution.engine import (
    COMPOSITE_NAMES,
    conservation,
    contrast_matrix,
    explain_batch,
    input_bounds,
    negative_fraction,
    untrained_copy,
)
from stda_hf.attribution.hook import explain_hook
from stda_hf.attribution.relevance import localization, region_share, summarize
from stda_hf.core.errors import StdaError
from stda_hf.explain.stage import ExplainConfig, run_explain
from stda_hf.models.vgg import VGG8, Preprocessing, save_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def small_vgg8(seed: int = 0) -> VGG8:
    torch.manual_seed(seed)
    return VGG8(widths=(4, 8, 8, 16, 16), hidden=(16, 16)).eval()


def random_batch_norms(model: nn.Module) -> nn.Module:
    """Give every batch norm non-trivial statistics, so that merging it changes the weights."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.running_var.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.running_mean.data = torch.randn(m.num_features, generator=gen) * 0.1
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
    return model


def bias_free(model: nn.Module) -> nn.Module:
    """Zero every bias, batch norm shifts included (BN keeps its scale): DTD conserves relevance exactly."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.data.zero_()
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.data.zero_()
            m.bias.data.zero_()
    return model


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Normalised images whose pixels lie in [0, 1] (inside the z^B box)."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def hooks_left(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    ]


# ----------------------------------------------------------------------------------------------------------------
# The checks that hold for DTD


def test_dtd_conserves_relevance_on_a_bias_free_vgg8_with_batch_norm():
    model = bias_free(random_batch_norms(small_vgg8()))
    expl = explain_batch(model, images(), method="dtd", mean=MEAN, std=STD)
    assert expl.explained.min() > 0
    assert torch.allclose(conservation(expl), torch.ones(4), atol=2e-3)


def test_dtd_relevance_is_non_negative_on_a_vgg8_with_biases():
    model = random_batch_norms(small_vgg8())
    expl = explain_batch(model, images(), method="dtd", mean=MEAN, std=STD)
    assert expl.relevance.min() >= 0
    assert negative_fraction(expl).max() == 0
    assert expl.relevance.sum() > 0


def test_biases_absorb_relevance_so_conservation_is_below_one():
    model = random_batch_norms(small_vgg8())  # default init: biases present
    expl = explain_batch(model, images(), method="dtd", mean=MEAN, std=STD)
    assert (conservation(expl) < 0.999).all()


def test_strict_dtd_zeroes_the_biases_and_conserves_relevance_on_a_vgg8_with_biases():
    model = random_batch_norms(small_vgg8())  # biases and batch-norm shifts present
    kept = explain_batch(model, images(), method="dtd", mean=MEAN, std=STD)
    strict = explain_batch(model, images(), method="dtd_strict", mean=MEAN, std=STD)
    assert torch.allclose(conservation(strict), torch.ones(4), atol=2e-3)
    assert (conservation(kept) < 0.999).all()
    assert strict.relevance.min() >= 0


def test_a_rule_that_subtracts_evidence_gives_negative_relevance_where_dtd_gives_none():
    model = random_batch_norms(small_vgg8())
    expl = explain_batch(model, images(), method="epsilon_alpha2_beta1", mean=MEAN, std=STD)
    assert negative_fraction(expl).max() > 0


def test_log_odds_of_the_predicted_class_are_explained_and_positive():
    model = small_vgg8()
    x = images()
    logits = model(x)
    expl = explain_batch(model, x, method="dtd", mean=MEAN, std=STD)
    t = logits.argmax(1)
    expected = logits.gather(1, t[:, None])[:, 0] - logits.gather(1, 1 - t[:, None])[:, 0]
    assert torch.equal(expl.target, t)
    assert torch.allclose(expl.explained, expected, atol=1e-5)
    assert (expl.explained >= 0).all()


def test_raw_logit_of_a_chosen_class_is_conserved_when_asked():
    model = bias_free(small_vgg8())
    x = images()
    target = torch.ones(4, dtype=torch.long)
    expl = explain_batch(model, x, target=target, method="dtd", mean=MEAN, std=STD, output="logit")
    assert torch.allclose(expl.explained, model(x)[:, 1], atol=1e-5)
    assert torch.allclose(conservation(expl), torch.ones(4), atol=2e-3)


def test_contrast_matrix_gives_each_class_against_the_mean_of_the_others():
    logits = torch.tensor([1.0, 4.0, -2.0])
    assert torch.allclose(contrast_matrix(3) @ logits, torch.tensor([0.0, 4.5, -4.5]))


def test_input_bounds_follow_the_normalisation():
    low, high = input_bounds((0.5, 0.4, 0.2), (0.25, 0.2, 0.1))
    assert low.shape == (1, 3, 1, 1)
    assert torch.allclose(low.flatten(), torch.tensor([-2.0, -2.0, -2.0]))
    assert torch.allclose(high.flatten(), torch.tensor([2.0, 3.0, 8.0]))


def test_bad_normalisation_is_refused():
    with pytest.raises(StdaError, match="positive std"):
        input_bounds((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))


# ----------------------------------------------------------------------------------------------------------------
# Every method by name; hooks always removed


@pytest.mark.parametrize("method", COMPOSITE_NAMES)
def test_every_method_name_gives_finite_relevance_of_the_input_shape(method):
    model = random_batch_norms(small_vgg8())
    expl = explain_batch(model, images(2), method=method, mean=MEAN, std=STD)
    assert expl.relevance.shape == (2, 3, 32, 32)
    assert torch.isfinite(expl.relevance).all()
    assert expl.relevance.abs().sum() > 0


def test_unknown_method_error_lists_the_valid_ones():
    with pytest.raises(StdaError, match=r"valid methods: dtd, dtd_strict, gradient, .*epsilon_plus_flat"):
        explain_batch(small_vgg8(), images(1), method="lrp")


@pytest.mark.parametrize("method", COMPOSITE_NAMES)
def test_explaining_leaves_the_model_as_it_was(method):
    model = random_batch_norms(small_vgg8()).train()
    x = images(2)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_out = model.eval()(x)
    model.train()
    explain_batch(model, x, method=method, mean=MEAN, std=STD)
    assert model.training  # mode restored
    assert hooks_left(model) == []
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.eval()(x), before_out)


class _FailsWithGrad(nn.Module):
    """Passes tensors through in a plain forward; fails inside the attribution (gradient enabled)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("boom")
        return x


def test_hooks_and_merged_batch_norm_are_removed_when_the_attribution_fails():
    model = random_batch_norms(small_vgg8())
    model.features.insert(2, _FailsWithGrad())  # after the first conv and its batch norm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        explain_batch(model, images(1), method="dtd", mean=MEAN, std=STD)
    assert hooks_left(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _HFStyle(nn.Module):
    """A classifier whose output carries ``.logits`` like a transformers model."""

    def __init__(self):
        super().__init__()
        self.net = small_vgg8()

    def forward(self, x):
        return SimpleNamespace(logits=self.net(x))


def test_models_returning_an_output_object_are_explained_through_its_logits():
    model = _HFStyle().eval()
    expl = explain_batch(model, images(2), method="dtd", mean=MEAN, std=STD)
    assert torch.allclose(expl.logits, model.net(images(2)))
    assert negative_fraction(expl).max() == 0


@pytest.fixture
def bf16_accelerator():
    """An Accelerator with bf16 autocast; its process-wide state is reset afterwards for the next runs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_mixed_precision_model_from_accelerate_is_explained_in_full_precision(bf16_accelerator):
    plain = random_batch_norms(small_vgg8())
    reference = explain_batch(plain, images(2), method="dtd", mean=MEAN, std=STD)
    wrapped = bf16_accelerator.unwrap_model(bf16_accelerator.prepare(random_batch_norms(small_vgg8())))
    assert not torch.equal(wrapped(images(2)), plain(images(2)))  # bf16 autocast for training and evaluation
    expl = explain_batch(wrapped, images(2), method="dtd", mean=MEAN, std=STD)
    assert expl.relevance.dtype == torch.float32
    assert torch.allclose(expl.relevance, reference.relevance)


def test_log_odds_are_refused_when_the_class_layer_is_not_the_output():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2), nn.Softplus()
    )
    with pytest.raises(StdaError, match="output='logit'"):
        explain_batch(model, images(2), method="dtd", mean=MEAN, std=STD)
    assert hooks_left(model) == []
    explain_batch(model, images(2), method="dtd", mean=MEAN, std=STD, output="logit")


# ----------------------------------------------------------------------------------------------------------------
# The numbers


def test_region_share_counts_positive_relevance_only():
    pixels = np.array([[2.0, -5.0], [1.0, 1.0]])
    mask = np.array([[255, 255], [0, 0]], np.uint8)
    assert region_share(pixels, mask) == pytest.approx(0.5)


def test_unknown_or_empty_regions_are_unavailable_not_zero():
    pixels = np.ones((4, 4))
    assert np.isnan(region_share(pixels, None))
    assert np.isnan(region_share(pixels, np.zeros((4, 4))))


def test_mask_of_another_size_is_refused():
    with pytest.raises(StdaError, match="does not match"):
        region_share(np.ones((4, 4)), np.ones((8, 8)))


def test_localization_reports_each_artifact_kind_and_the_areas():
    pixels = np.zeros((4, 4))
    pixels[0, 0], pixels[3, 3], pixels[1, 1] = 3.0, 1.0, 4.0
    lesion = np.zeros((4, 4), np.uint8)
    lesion[1:3, 1:3] = 1
    artifacts = np.zeros((4, 4), np.uint8)
    artifacts[0, :] = 1  # ruler along the top
    artifacts[3, 3] = 2  # a patch pixel
    numbers = localization(pixels, lesion, artifacts)
    assert numbers["relevance_in_mask"] == pytest.approx(0.5)
    assert numbers["mask_area"] == pytest.approx(0.25)
    assert numbers["relevance_on_artifact"] == pytest.approx(0.5)
    assert numbers["relevance_on_ruler"] == pytest.approx(3 / 8)
    assert numbers["relevance_on_patch"] == pytest.approx(1 / 8)
    assert np.isnan(numbers["relevance_on_ink"])  # no ink in this image


def test_summary_averages_only_where_known_and_counts_the_images():
    rows = [
        localization(np.ones((2, 2)), np.array([[1, 0], [0, 0]]), None),
        localization(np.ones((2, 2)), None, None),
    ]
    s = summarize(rows)
    assert s["n_images"] == 2 and s["n_with_mask"] == 1
    assert s["relevance_in_mask"] == pytest.approx(0.25)
    assert s["relevance_on_artifact"] is None and s["n_with_artifact"] == 0


def test_measurement_module_loads_by_path_and_reports_unavailable_masks():
    from stda_hf.metrics import load_metric

    measurement = load_metric("relevance_localization", module_type="measurement")
    r = np.zeros((4, 4), np.float32)
    r[:2] = 1.0
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 255
    out = measurement.compute(relevance=[r, r], lesion_mask=[mask, None], artifact_mask=[None, None])
    assert out["relevance_in_mask"] == pytest.approx(0.5)
    assert out["n_with_mask"] == 1 and out["n_images"] == 2
    assert out["relevance_on_artifact"] is None
    json.dumps(out, allow_nan=False)  # saved as plain JSON


# ----------------------------------------------------------------------------------------------------------------
# The shortcut test: a planted colour patch


def _tiny_net() -> nn.Module:
    """Bias-free and without batch norm: a zero input region stays exactly zero through every layer."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 2, bias=False),
    )


def _train(x: torch.Tensor, y: torch.Tensor, steps: int = 100) -> nn.Module:
    torch.manual_seed(0)
    model = _tiny_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def patch_phantoms(tmp_path_factory):
    """Phantoms with a colour patch in every benign image and none in malignant ones (40 px)."""
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.real import read_real_folder

    root = tmp_path_factory.mktemp("shortcut") / "real"
    make_phantoms(root, PhantomConfig(n=120, size=40, seed=0, hair=0.0, artifacts={"patch": (1.0, 0.0)}))
    ims = read_real_folder(root).labelled
    x = np.stack([np.asarray(Image.open(im.path).convert("RGB")) for im in ims]) / 255.0
    x = (torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2) - 0.5) / 0.25
    masks = np.stack([np.asarray(Image.open(im.mask_path)) > 0 for im in ims])
    artifacts = np.stack(
        [np.asarray(Image.open(im.artifact_path)) if im.artifact_path else 0 * masks[0] for im in ims]
    )
    y = torch.tensor([im.label == "malignant" for im in ims]).long()
    return x, y, masks, artifacts.astype(np.uint8)


def _shares(model, x, masks, artifacts, benign) -> dict:
    expl = explain_batch(model, x[benign], method="dtd", mean=MEAN, std=STD)
    rows = [
        localization(p, masks[i], artifacts[i])
        for p, i in zip(expl.pixels.numpy(), benign.tolist(), strict=True)
    ]
    return summarize(rows)


def test_relevance_finds_a_planted_shortcut_and_a_lesion_only_model(patch_phantoms):
    x, y, masks, artifacts = patch_phantoms
    benign = (y == 0).nonzero()[:, 0]
    assert (artifacts[benign.numpy()] == 2).any(axis=(1, 2)).all()  # the patch is in every benign image
    # The lesion-only model sees the lesion interior and nothing else (zero elsewhere, in normalised units).
    inside = torch.tensor(np.stack([binary_erosion(m, iterations=2) for m in masks]), dtype=torch.float32)
    x_lesion = x * inside[:, None]
    shortcut, lesion_only = _train(x, y), _train(x_lesion, y)
    assert (shortcut(x).argmax(1) == y).float().mean() > 0.9

    cheat = _shares(shortcut, x, masks, artifacts, benign)
    honest = _shares(lesion_only, x_lesion, masks, artifacts, benign)
    assert honest["relevance_in_mask"] > 0.9
    assert cheat["relevance_in_mask"] < 0.1
    assert cheat["relevance_on_patch"] > 0.5 > honest["relevance_on_patch"]
    assert cheat["relevance_on_patch"] > 10 * cheat["artifact_area"]  # far more than its share of the image


# ----------------------------------------------------------------------------------------------------------------
# The stage: stda explain, and the train.py hook


@pytest.fixture
def saved_model(tmp_path):
    """A run folder as train.py leaves it: the final model in ``<run>/model``."""
    run = tmp_path / "run"
    save_model(small_vgg8(), run / "model", Preprocessing(40, MEAN, STD))
    return run


def test_explain_folder_writes_heatmaps_numbers_and_grid(phantom_real, saved_model, tmp_path):
    out = tmp_path / "heatmaps"
    s = run_explain(
        saved_model, out, ExplainConfig(split="validation", grid=4, columns=2), images=phantom_real
    )
    records = [json.loads(line) for line in (out / "relevance.jsonl").read_text().splitlines()]
    assert s.explained == s.total == len(records) > 0
    for r in records:
        with Image.open(out / "heatmaps" / f"{r['id']}.png") as img:
            assert img.format == "PNG" and img.size == (40, 40)  # the model's input size
        assert (out / "overlays" / f"{r['id']}.png").is_file()
        assert 0 <= r["relevance_in_mask"] <= 1  # phantoms have masks
    header = (out / "relevance.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["id", "label", "origin"] and "relevance_in_mask" in header
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_with_mask"] == len(records) and summary["method"] == "dtd"
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width > 4 * 40


def test_untrained_copy_reinitialises_every_parameter_and_leaves_the_model_alone():
    model = small_vgg8(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.features[1].running_mean += 1.0  # a trained batch norm's statistics
    copy, again = untrained_copy(model, seed=0), untrained_copy(model, seed=0)
    weights = [k for k in before if k.endswith("weight") and before[k].dim() > 1]
    assert all(not torch.equal(copy.state_dict()[k], model.state_dict()[k]) for k in weights)
    assert all(torch.equal(copy.state_dict()[k], again.state_dict()[k]) for k in before)  # seeded
    assert torch.equal(copy.features[1].running_mean, torch.zeros_like(copy.features[1].running_mean))
    assert float(model.features[1].running_mean.min()) >= 1.0 and not copy.training


def test_explain_reports_each_share_beside_an_untrained_reference(phantom_real, tmp_path):
    run, out = tmp_path / "run", tmp_path / "ref"
    save_model(small_vgg8(seed=5), run / "model", Preprocessing(40, MEAN, STD))  # other weights than seed 0's
    s = run_explain(run, out, ExplainConfig(split="validation", grid=0), images=phantom_real)
    records = [json.loads(line) for line in (out / "relevance.jsonl").read_text().splitlines()]
    assert all(0 <= r["untrained_relevance_in_mask"] <= 1 for r in records)
    assert any(r["untrained_relevance_in_mask"] != r["relevance_in_mask"] for r in records)
    reference = s.numbers["untrained"]["relevance_in_mask"]
    assert reference == pytest.approx(np.mean([r["untrained_relevance_in_mask"] for r in records]))
    assert f"(untrained model of the same architecture: {reference:.3f})" in s.format()
    assert "untrained_relevance_in_mask" in (out / "relevance.csv").read_text().splitlines()[0]


def test_an_untrained_model_is_its_own_reference(phantom_real, tmp_path):
    """The known answer: a model that learned nothing scores exactly its reference's shares."""
    run = tmp_path / "run"
    save_model(untrained_copy(small_vgg8(), seed=0), run / "model", Preprocessing(40, MEAN, STD))
    s = run_explain(run, tmp_path / "h", ExplainConfig(split="validation", grid=0), images=phantom_real)
    assert s.numbers["untrained"]["relevance_in_mask"] == pytest.approx(s.numbers["relevance_in_mask"])


def test_explain_without_a_reference_skips_it(phantom_real, saved_model, tmp_path):
    s = run_explain(
        saved_model,
        tmp_path / "h",
        ExplainConfig(split="test", grid=0, reference="none"),
        images=phantom_real,
    )
    assert "untrained" not in s.numbers and "untrained model" not in s.format()


def test_explain_resumes_after_an_interruption_without_redoing_finished_images(
    phantom_real, saved_model, tmp_path
):
    out, cfg = tmp_path / "h", ExplainConfig(split="all", limit=6, grid=2)
    run_explain(saved_model, out, cfg, images=phantom_real)
    lines = (out / "relevance.jsonl").read_text().splitlines(keepends=True)
    (out / "relevance.jsonl").write_text("".join(lines[:3]))  # as if killed after the third image
    kept = {json.loads(line)["id"] for line in lines[:3]}
    stamps = {i: (out / "heatmaps" / f"{i}.png").stat().st_mtime_ns for i in kept}
    s = run_explain(saved_model, out, cfg, images=phantom_real)
    assert s.explained == 3 and s.total == 6
    assert {i: (out / "heatmaps" / f"{i}.png").stat().st_mtime_ns for i in kept} == stamps
    ids = [json.loads(line)["id"] for line in (out / "relevance.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6


def test_explain_refuses_results_of_other_settings_without_overwrite(phantom_real, saved_model, tmp_path):
    out = tmp_path / "h"
    run_explain(saved_model, out, ExplainConfig(split="test", grid=0), images=phantom_real)
    with pytest.raises(StdaError, match=r"method: 'dtd' -> 'gradient'.*--overwrite"):
        run_explain(saved_model, out, ExplainConfig(split="test", method="gradient"), images=phantom_real)


def test_explain_from_python_refuses_an_output_inside_its_image_folder(phantom_real, saved_model):
    with pytest.raises(StdaError, match="is \\(inside\\) the image folder"):
        run_explain(saved_model, phantom_real / "explained", ExplainConfig(split="test"), images=phantom_real)
    assert not (phantom_real / "explained").exists()


def test_explain_needs_exactly_one_source(saved_model, tmp_path):
    with pytest.raises(StdaError, match="exactly one"):
        run_explain(saved_model, tmp_path / "h")


def test_plain_image_folder_is_explained_with_masks_unavailable(saved_model, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (50, 30), (40 * i, 90, 120)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    s = run_explain(saved_model, tmp_path / "h", ExplainConfig(grid=3), images=folder)
    assert s.total == 3 and s.skipped == 1
    assert s.numbers["relevance_in_mask"] is None and s.numbers["n_with_mask"] == 0
    assert "unavailable" in s.format()


def test_dataset_rows_that_do_not_decode_are_skipped_and_reported():
    import io

    import datasets

    from stda_hf.attribution.hook import row_samples
    from stda_hf.data.images import SkipReport

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["benign", "malignant"]),
            "isic_id": datasets.Value("string"),
        }
    )
    rows = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"not a png", "path": None}],
            "label": [1, 0],
            "isic_id": ["ISIC_0000001", "ISIC_0000002"],
        },
        features=features,
    )
    report = SkipReport()
    samples = list(row_samples(rows, report))
    assert [(s.id, s.label, s.mask) for s in samples] == [("ISIC_0000001", "malignant", None)]
    assert list(report.skipped) == ["row 1 (ISIC_0000002)"]


def test_target_true_needs_labels(saved_model, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    with pytest.raises(StdaError, match="--target true needs labels"):
        run_explain(saved_model, tmp_path / "h", ExplainConfig(target="true"), images=folder)


def test_explain_a_packaged_dataset_split_from_the_command_line(phantom_real, saved_model, tmp_path, capsys):
    from stda_hf.cli import main
    from stda_hf.dataset.packaging import package

    package(phantom_real, tmp_path / "hub")
    out = tmp_path / "h"
    argv = [
        "explain",
        "--model",
        str(saved_model / "model"),
        "--dataset",
        str(tmp_path / "hub"),
        "--out",
        str(out),
    ]
    assert main([*argv, "--split", "validation", "--grid", "4", "--method", "epsilon_plus_flat"]) == 0
    printed = capsys.readouterr().out
    assert "positive relevance inside the lesion mask:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "epsilon_plus_flat" and summary["n_with_mask"] == summary["n_images"] > 0


def test_cli_reports_an_unknown_split_in_one_line(phantom_real, saved_model, tmp_path, capsys):
    from stda_hf.cli import main

    argv = [
        "explain",
        "--model",
        str(saved_model),
        "--images",
        str(phantom_real),
        "--out",
        str(tmp_path / "h"),
    ]
    assert main([*argv, "--split", "holdout"]) == 2
    assert "unknown split 'holdout'" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()  # refused before anything is written


def test_unsafe_file_names_become_distinct_safe_ids(saved_model, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("my lesion.png", "my_lesion.png", "x.png"):  # a space is not allowed in an id
        Image.new("RGB", (32, 32), (120, 80, 60)).save(folder / name)
    run_explain(saved_model, tmp_path / "h", ExplainConfig(grid=0), images=folder)
    assert sorted(p.name for p in (tmp_path / "h" / "heatmaps").iterdir()) == [
        "my_lesion.png",
        "my_lesion_2.png",
        "x.png",
    ]


def test_comparison_script_shows_both_models_and_their_paired_difference(
    phantom_real, saved_model, tmp_path, capsys
):
    spec = importlib.util.spec_from_file_location(
        "compare_explanations", BENCHMARKS / "compare_explanations.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    other = tmp_path / "other"
    save_model(small_vgg8(seed=1), other / "model", Preprocessing(40, MEAN, STD))
    out = tmp_path / "cmp"
    script.main(
        [
            "--baseline",
            str(saved_model),
            "--stda",
            str(other),
            "--images",
            str(phantom_real),
            "--split",
            "all",
            "--limit",
            "6",
            "--rows",
            "3",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "relevance_in_mask, ST-DA - baseline:" in printed and "untrained" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert result["relevance_in_mask_difference"]["n"] == 6
    models = result["models"]
    assert (
        models["baseline"]["n_images"] == models["ST-DA"]["n_images"] == models["untrained"]["n_images"] == 6
    )
    # the reference is a freshly initialised network of the baseline's architecture (seed 0): the fixture's
    # baseline is itself an untrained seed-0 VGG8, so it reads exactly its reference; the other model does not
    shares = {n: models[n]["relevance_in_mask"] for n in ("baseline", "ST-DA", "untrained")}
    assert shares["untrained"] == shares["baseline"] != shares["ST-DA"], shares
    with Image.open(out / "comparison.png") as figure:
        assert figure.format == "PNG" and figure.height > 3 * 128


class _ImageTracker:
    name = "fake"

    def __init__(self):
        self.logged = []

    def log_images(self, values, step):
        self.logged.append((values, step))


def test_training_hook_saves_the_grid_logs_it_and_returns_numbers(phantom_real, tmp_path):
    import datasets

    from stda_hf.dataset.packaging import package
    from stda_hf.models.vgg import eval_transform

    package(phantom_real, tmp_path / "hub")
    val = datasets.load_dataset(str(tmp_path / "hub"), split="validation")
    pre = Preprocessing(40, MEAN, STD)
    tracker = _ImageTracker()
    ctx = SimpleNamespace(
        model=small_vgg8(),
        accelerator=SimpleNamespace(is_main_process=True, trackers=[tracker]),
        epoch=3,
        split="validation",
        dataset=val,
        preprocessing=pre,
        transform=eval_transform(pre),
        run_dir=tmp_path,
    )
    numbers = explain_hook(n_images=4)(ctx)
    assert (tmp_path / "heatmaps" / "validation-epoch_0003.png").is_file()
    assert tracker.logged[0][1] == 3 and "validation/heatmaps" in tracker.logged[0][0]
    assert 0 <= numbers["dtd_relevance_in_mask"] <= 1
    assert numbers["dtd_negative_fraction"] == 0
    assert all(isinstance(v, float) for v in numbers.values())


TINY_TRAIN = tiny_train_flags(epochs=1)


def _train_py():
    spec = importlib.util.spec_from_file_location("train_script", BENCHMARKS.parent / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_train_py_explains_fixed_validation_images_at_each_evaluation(phantom_hub, tmp_path):
    run = tmp_path / "run"
    assert _train_py().main(["--dataset", str(phantom_hub), *TINY_TRAIN, "--output-dir", str(run)]) == 0
    grids = sorted(p.name for p in (run / "heatmaps").iterdir())
    assert grids[0].startswith("test-epoch_") and grids[1:] == [
        "validation-epoch_0001.png"
    ]  # test: best epoch
    for name in grids:
        with Image.open(run / "heatmaps" / name) as grid:
            assert grid.format == "PNG"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert 0 <= records[0]["validation/dtd_relevance_in_mask"] <= 1
    assert records[0]["validation/dtd_negative_fraction"] == 0
    assert "test/dtd_relevance_in_mask" in records[-1]


def test_train_py_explanations_can_be_switched_off_or_use_another_method(phantom_hub, tmp_path, capsys):
    train = _train_py()
    argv = ["--dataset", str(phantom_hub), *TINY_TRAIN]
    assert train.main([*argv, "--output-dir", str(tmp_path / "off"), "--explain-images", "0"]) == 0
    assert not (tmp_path / "off" / "heatmaps").exists()
    assert train.main([*argv, "--output-dir", str(tmp_path / "bad"), "--explain-method", "lrp"]) == 2
    assert "valid methods: dtd, dtd_strict, gradient" in capsys.readouterr().err


def test_explaining_during_training_changes_neither_weights_nor_metrics(phantom_hub, tmp_path):
    from safetensors.torch import load_file

    from stda_hf.training import TrainConfig, run_training

    tiny = {**TINY_VGG8, "epochs": 2, "dataset": str(phantom_hub)}
    plain = run_training(TrainConfig(output_dir=str(tmp_path / "plain"), explain_images=0, **tiny))
    explained = run_training(
        TrainConfig(output_dir=str(tmp_path / "explained"), **tiny), on_evaluate=explain_hook(4)
    )
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(tmp_path / "explained" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in explained.test.items() if not k.startswith("dtd_")} == plain.test


def test_explanation_settings_live_in_the_run_config(phantom_hub, tmp_path):
    import yaml

    from stda_hf.core.errors import StdaError
    from stda_hf.training import TrainConfig, run_training

    cfg = TrainConfig(
        **TINY_VGG8, dataset=str(phantom_hub), output_dir=str(tmp_path / "run"), epochs=1, explain_images=2,
        explain_method="gradient",
    )  # fmt: skip
    run_training(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["explain_images"] == 2 and saved["explain_method"] == "gradient"
    assert any(p.name.startswith("validation-epoch_") for p in (tmp_path / "run" / "heatmaps").iterdir())
    with pytest.raises(StdaError, match="valid methods"):
        run_training(
            TrainConfig(dataset=str(phantom_hub), output_dir=str(tmp_path / "x"), explain_method="lrp")
        )


def test_a_fixed_target_with_a_negative_score_still_measures_where_its_evidence_lies():
    from stda_hf import LABELS
    from stda_hf.attribution.hook import Sample, explain_samples
    from stda_hf.models.vgg import eval_transform

    model = random_batch_norms(small_vgg8())
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    samples = [Sample(f"im{i}", im, mask=mask) for i, im in enumerate(pictures)]
    transform = eval_transform(Preprocessing(32, MEAN, STD))
    results = {t: explain_samples(model, samples, transform, MEAN, STD, target=t) for t in LABELS}
    for benign, malignant in zip(results["benign"], results["malignant"], strict=True):
        assert benign.explained == pytest.approx(-malignant.explained, abs=1e-4)  # one of the two is negative
        negative = benign if benign.explained < 0 else malignant
        share = float((np.abs(negative.pixels) * mask).sum() / np.abs(negative.pixels).sum())
        assert negative.numbers["relevance_in_mask"] == pytest.approx(share, rel=1e-4)


def _class_map_correlation(method: str, output: str) -> float:
    """Mean correlation, over images, of the maps explaining benign and malignant with the same model."""
    model, x = small_vgg8(seed=1), torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    maps = [
        explain_batch(model, x, torch.full((4,), c), method, MEAN, STD, output).pixels.reshape(4, -1).numpy()
        for c in (0, 1)
    ]
    return float(np.mean([np.corrcoef(maps[0][i], maps[1][i])[0, 1] for i in range(4)]))


def test_log_odds_and_z_plus_maps_are_class_insensitive_and_gradient_or_epsilon_on_logits_are_not():
    """What docs/explain.md says each choice can show: the benign map of the log-odds is the malignant map negated
    under every method, z+ DTD stays so even on a logit; gradient and epsilon rules on a logit differ per class."""
    assert _class_map_correlation("dtd", "log_odds") < -0.99
    assert _class_map_correlation("gradient", "log_odds") < -0.99
    assert _class_map_correlation("dtd", "logit") < -0.99
    assert _class_map_correlation("gradient", "logit") > -0.9
    assert _class_map_correlation("epsilon_plus_flat", "logit") > -0.9
