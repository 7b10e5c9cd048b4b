"""Reliance by intervention, validated where the answer is known: models built by hand to ignore the planted
patch, or to read it, on phantoms whose patch can be taken off and put on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from stda_hf.benchmark.reliance import measure_reliance, reliance_numbers, roc_auc
from stda_hf.core.errors import StdaError
from stda_hf.data.phantoms import PhantomConfig, make_phantoms
from stda_hf.data.real import read_real_folder
from stda_hf.models.vgg import Preprocessing

PRE = Preprocessing(48)


class HandMade(nn.Module):
    """Malignant log-odds from lesion darkness in the centre, minus ``patch_weight`` x the blue of the patch."""

    def __init__(self, patch_weight: float):
        super().__init__()
        self.patch_weight = patch_weight
        self.register_buffer("mean", torch.tensor(PRE.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(PRE.std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * self.std + self.mean
        darkness = 1 - rgb[:, :, 12:36, 12:36].mean(dim=(1, 2, 3))  # the lesion sits in the centre
        blue = (rgb[:, 2] - rgb[:, 0]).amax(dim=(1, 2)).clamp(min=0)  # the patch's blue cell, in a corner
        score = 10 * darkness - self.patch_weight * blue
        return torch.stack([torch.zeros_like(score), score], dim=1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliance")
    make_phantoms(out, PhantomConfig(n=40, size=48, artifacts={"ruler": (0.3, 0.3), "patch": (0.0, 0.0)}))
    return out, read_real_folder(out).labelled


def test_a_model_that_ignores_the_artifact_has_zero_reliance(phantoms):
    root, images = phantoms
    numbers = measure_reliance(HandMade(patch_weight=0.0), PRE, root, images, "patch")
    assert numbers["reliance"] == pytest.approx(0.0, abs=1e-6)
    assert numbers["roc_auc_clean"] == pytest.approx(numbers["roc_auc_reversed"])


def test_a_model_that_reads_the_patch_as_benign_has_negative_reliance_and_loses_auc_when_it_is_reversed(
    phantoms,
):
    root, images = phantoms
    numbers = measure_reliance(HandMade(patch_weight=20.0), PRE, root, images, "patch")
    assert numbers["reliance"] < -1.0  # more than one SD of its own log-odds
    assert numbers["reliance_benign"] < 0 and numbers["reliance_malignant"] < 0
    assert numbers["roc_auc_reversed"] < numbers["roc_auc_clean"] - 0.2


def test_reliance_grows_with_the_weight_on_the_artifact(phantoms):
    root, images = phantoms
    values = [measure_reliance(HandMade(w), PRE, root, images, "patch")["reliance"] for w in (0.0, 2.0, 8.0)]
    assert values[0] > values[1] > values[2]


def test_reliance_numbers_on_known_shifts():
    without = np.array([-2.0, -1.0, 1.0, 2.0])
    malignant = np.array([False, False, True, True])
    sd = np.std(without, ddof=1)
    same = reliance_numbers(without, without, malignant)
    assert same["reliance"] == 0 and same["roc_auc_clean"] == same["roc_auc_reversed"] == 1.0
    shifted = reliance_numbers(without, without - 2 * sd, malignant)
    assert shifted["reliance"] == pytest.approx(-2.0) and shifted["reliance_malignant"] == pytest.approx(-2.0)
    assert shifted["roc_auc_reversed"] == pytest.approx(0.25)  # 3 of 4 malignant-benign pairs now misordered
    assert math.isnan(reliance_numbers(np.ones(3), np.ones(3), np.array([0, 1, 1], bool))["reliance"])


def test_roc_auc_is_the_mann_whitney_probability():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert math.isnan(roc_auc(np.array([1.0, 2.0]), np.array([True, True])))


def test_reliance_needs_a_phantom_folder(tmp_path, phantoms):
    _, images = phantoms
    with pytest.raises(StdaError, match="no phantoms"):
        measure_reliance(HandMade(0.0), PRE, tmp_path, images, "patch")
