"""Device choice: one rule for every stage that runs a network."""

from __future__ import annotations

import pytest
import torch

from stda_hf.core.devices import check_device_name, resolve_device
from stda_hf.core.errors import StdaError


def test_auto_is_the_cpu_without_cuda_and_cpu_is_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_an_unknown_device_name_is_refused_with_the_valid_forms():
    with pytest.raises(StdaError, match=r"unknown --device 'tpu0'; use auto, cpu, cuda or cuda:N"):
        check_device_name("tpu0")
    with pytest.raises(StdaError, match="unknown --device"):
        resolve_device("tpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_where_there_is_none_says_to_use_the_cpu():
    with pytest.raises(StdaError, match="CUDA is not available here; use --device cpu"):
        resolve_device("cuda:0")
