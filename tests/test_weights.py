"""Weights resolution: random with a seed, local files (safetensors or weights-only .pth), clear offline errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from stda_hf.errors import StdaError
from stda_hf.models.weights import load_weights, parse_weights


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_random_weights_are_seeded():
    a = load_weights(_net(), parse_weights("random", seed=1))
    b = load_weights(_net(), parse_weights("random", seed=1))
    c = load_weights(_net(), parse_weights("random", seed=2))
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_load_from_a_local_file(tmp_path, suffix):
    src = load_weights(_net(), parse_weights("random", seed=5))
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    dst = load_weights(_net(), parse_weights(path))
    assert torch.equal(dst[2].weight, src[2].weight)


def test_a_file_of_a_larger_network_fills_a_truncated_one(tmp_path):
    big = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Conv2d(2, 2, 1))
    save_file(big.state_dict(), str(tmp_path / "big.safetensors"))
    small = load_weights(_net(), parse_weights(tmp_path / "big.safetensors"))
    assert torch.equal(small[0].weight, big[0].weight)


def test_shape_mismatch_is_refused(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    save_file(other.state_dict(), str(tmp_path / "o.safetensors"))
    with pytest.raises(StdaError, match="shapes differ"):
        load_weights(_net(), parse_weights(tmp_path / "o.safetensors"))


def test_unrelated_file_is_refused(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(StdaError, match="missing"):
        load_weights(_net(), parse_weights(tmp_path / "x.safetensors"))


def test_pickled_objects_are_not_executed(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a whole module, not a state dict
    with pytest.raises(StdaError, match="cannot read weights"):
        load_weights(_net(), parse_weights(tmp_path / "pickled.pth"))


def test_unknown_weights_value_names_the_options():
    with pytest.raises(StdaError, match="not 'imagenet', 'random' or an existing file"):
        parse_weights("imagenett")


def test_offline_download_names_both_ways_out():
    def offline():
        raise ConnectionError("no network")

    with pytest.raises(StdaError, match=r"--weights PATH.*--weights random"):
        load_weights(_net(), parse_weights("imagenet"), download=offline)
