"""Classifiers: VGG8's layer list and input sizes, seeded weights, safetensors round trips, torchvision and
transformers models, and clear errors for bad names and options."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from stda_hf.core.errors import StdaError
from stda_hf.models import VGG8, Preprocessing, build_model, load_model, save_model
from stda_hf.models.vgg import TorchvisionVGG, default_preprocessing, describe_weights, logits_of

TINY = {"widths": (4, 8, 8, 16, 16), "hidden": (16, 16)}


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vgg8_has_five_convolutions_and_three_linear_layers():
    model = VGG8()
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert kinds == ["Conv2d"] * 5 + ["Linear"] * 3
    layers = model.layer_list()
    assert len(layers) == 8
    assert layers[0].startswith("1. Conv2d(3, 64, 3x3, padding 1) - BatchNorm2d - ReLU - MaxPool2d(2)")
    assert layers[-1] == "8. Linear(512, 2)"


@pytest.mark.parametrize("size", [32, 50, 64, 224])
def test_vgg8_classifies_images_from_32_to_224_pixels(size):
    model = VGG8(**TINY).eval()
    assert model(torch.rand(2, 3, size, size)).shape == (2, 2)


def test_vgg8_is_built_from_modules_zennit_can_explain():
    model = VGG8(**TINY)
    allowed = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(isinstance(m, (*allowed, nn.Dropout)) for m in leaves)
    feats = list(model.features)
    convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    assert all(isinstance(feats[i + 1], nn.BatchNorm2d) for i in convs)  # canonizers merge BN into the conv


def test_vgg8_options_remove_batch_norm_and_set_dropout():
    model = VGG8(**TINY, batch_norm=False, dropout=0.25)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.25}


def test_random_weights_depend_on_the_seed_alone():
    torch.manual_seed(123)
    a = build_model("vgg8", "random", seed=7, **TINY)
    torch.manual_seed(456)
    b = build_model("vgg8", "random", seed=7, **TINY)
    c = build_model("vgg8", "random", seed=8, **TINY)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_saved_model_is_a_transformers_model_that_auto_classes_and_load_model_reload(tmp_path):
    from transformers import AutoModelForImageClassification

    model = build_model("vgg8", seed=1, **TINY).eval()
    save_model(model, tmp_path / "model", Preprocessing(48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_stda_vgg.py"} <= files
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "stda-vgg" and config["widths"] == [4, 8, 8, 16, 16]
    assert config["id2label"] == {"0": "benign", "1": "malignant"} and config["label2id"]["malignant"] == 1
    assert config["auto_map"]["AutoModelForImageClassification"].startswith("modeling_stda_vgg.")
    via_auto = AutoModelForImageClassification.from_pretrained(tmp_path / "model").eval()
    via_run_folder, pre = load_model(tmp_path)  # a run folder: its model/ sub-folder is used
    x = torch.rand(3, 3, 48, 48)
    out = model(x)
    assert type(out).__name__ == "ImageClassifierOutput"
    assert torch.equal(out.logits, via_auto(x).logits) and torch.equal(out.logits, via_run_folder(x).logits)
    assert pre == Preprocessing(48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_labels_give_the_cross_entropy_loss():
    model = build_model("vgg8", seed=1, **TINY).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    out = model(pixel_values=x, labels=y)
    assert torch.allclose(out.loss, nn.functional.cross_entropy(out.logits, y))


def test_plain_vgg8_saves_as_the_same_transformers_model(tmp_path):
    plain = VGG8(**TINY).eval()
    save_model(plain, tmp_path, Preprocessing(32))
    again, _ = load_model(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(plain(x), again(x).logits)


def test_model_folder_of_an_earlier_version_still_loads(tmp_path):
    from safetensors.torch import save_file

    plain = VGG8(**TINY).eval()  # what PyTorchModelHubMixin wrote: the init arguments and the weights
    old = {"num_classes": 2, "widths": [4, 8, 8, 16, 16], "hidden": [16, 16], "batch_norm": True}
    old.update(dropout=0.5, pool_size=2, in_channels=3, stda_architecture="VGG8")
    (tmp_path / "config.json").write_text(json.dumps(old))
    save_file(plain.state_dict(), tmp_path / "model.safetensors")
    model, pre = load_model(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(plain(x), model(x).logits) and pre == Preprocessing(224, resize="squash")  # as then


def test_image_processor_is_loaded_by_transformers_and_equals_the_eval_transform(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    from stda_hf.models.vgg import eval_transform

    pre = Preprocessing(40, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    save_model(VGG8(**TINY), tmp_path, pre)
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(proc).__name__ == "StdaImageProcessor" and proc.size == {"height": 40, "width": 40}
    gen = torch.Generator().manual_seed(0)
    for shape, mode in (((57, 31, 3), "RGB"), ((64, 64), "L"), ((20, 90, 3), "RGB")):
        image = Image.fromarray(
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).numpy()
        ).convert(mode)
        expected = eval_transform(pre)(image.convert("RGB"))
        assert torch.equal(proc(image, return_tensors="pt")["pixel_values"][0], expected)


def test_preprocessor_config_stores_size_as_height_and_width_as_transformers_processors_do(tmp_path):
    save_model(VGG8(**TINY), tmp_path, Preprocessing(40))
    stored = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert stored["size"] == {"height": 40, "width": 40}
    assert load_model(tmp_path)[1] == Preprocessing(40)


def test_a_new_head_for_other_labels_gets_pytorchs_initialisation_and_keeps_the_features(tmp_path):
    from transformers import AutoModelForImageClassification

    model = build_model("vgg8", seed=1, **TINY).eval()
    save_model(model, tmp_path, Preprocessing(32))
    three = AutoModelForImageClassification.from_pretrained(
        tmp_path, num_labels=3, ignore_mismatched_sizes=True
    ).eval()
    head = three.classifier[-1]
    bound = 1 / 16**0.5  # nn.Linear(16, 3): weights and bias uniform in +-1/sqrt(fan_in)
    assert head.weight.shape == (3, 16) and torch.isfinite(head.weight).all()
    assert 0.2 * bound < head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    assert torch.equal(three.features[0].weight, model.features[0].weight)
    assert torch.equal(three.classifier[0].weight, model.classifier[0].weight)


def test_saved_weights_file_has_the_mode_of_its_siblings(tmp_path):
    save_model(VGG8(**TINY), tmp_path, Preprocessing(32))
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["preprocessor_config.json"], modes


def test_the_transformers_model_is_explained_like_the_plain_vgg8():
    from stda_hf.attribution.engine import explain_batch

    plain = VGG8(**TINY).eval()
    hf = build_model("vgg8", "random", **TINY).eval()
    hf.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    a, b = explain_batch(plain, x, method="dtd"), explain_batch(hf, x, method="dtd")
    assert torch.allclose(a.relevance, b.relevance) and a.relevance.abs().sum() > 0


def test_weights_file_of_another_vgg8_is_refused_with_its_shapes(tmp_path):
    from safetensors.torch import save_file

    save_file(VGG8(widths=(2, 2, 2, 2, 2), hidden=(4, 4)).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(StdaError, match="shapes differ"):
        build_model("vgg8", str(tmp_path / "w.safetensors"), **TINY)


def test_torchvision_vgg_takes_imagenet_weights_and_gets_a_fresh_two_class_head(monkeypatch):
    import torchvision

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TorchvisionVGG("vgg11", num_classes=1000).state_dict().items()}
    imagenet = {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(shapes.items())}

    class FakeWeights:  # stands in for the download (tests never fetch weights)
        class IMAGENET1K_V1:
            @staticmethod
            def get_state_dict(progress: bool = False):
                return imagenet

    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: FakeWeights)
    model = build_model("vgg11", "imagenet", seed=0)
    state = model.state_dict()
    assert torch.equal(state["features.0.weight"], imagenet["features.0.weight"])
    assert torch.equal(state["classifier.3.weight"], imagenet["classifier.3.weight"])
    assert state["classifier.6.weight"].shape == (2, 4096)
    assert model.eval()(torch.rand(1, 3, 32, 32)).logits.shape == (1, 2)
    assert model.config.id2label == {0: "benign", 1: "malignant"}


def test_offline_imagenet_download_names_both_ways_out(monkeypatch):
    import torchvision

    class Offline:
        class IMAGENET1K_V1:
            @staticmethod
            def get_state_dict(progress: bool = False):
                raise ConnectionError("no network")

    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: Offline)
    with pytest.raises(StdaError, match="--weights random"):
        build_model("vgg16", "auto")  # refused before the 138M-parameter model is even built


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_transformers_model_from_a_local_folder_gets_two_labelled_classes(tiny_vit, tmp_path):
    model = build_model(str(tiny_vit)).eval()
    assert model.config.id2label == {0: "benign", 1: "malignant"}
    x = torch.rand(2, 3, 32, 32)
    assert logits_of(model(pixel_values=x)).shape == (2, 2)
    save_model(model, tmp_path, Preprocessing(32))
    again, pre = load_model(tmp_path)
    assert torch.equal(logits_of(model(x)), logits_of(again(x)))
    assert pre.image_size == 32


def test_transformers_preprocessing_falls_back_to_imagenet_statistics(tiny_vit):
    pre = default_preprocessing(str(tiny_vit), 32)
    assert pre == Preprocessing(32)


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(StdaError, match=r"unknown model 'resnet5'.*vgg8.*vgg16_bn"):
        build_model("resnet5")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": (8, 8, 8)}, "5 positive convolution widths"),
        ({"hidden": (0, 8)}, "2 positive hidden sizes"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"depth": 3}, r"takes no option\(s\) \['depth'\]"),
    ],
)
def test_bad_vgg8_options_are_refused_with_the_value(kwargs, message):
    with pytest.raises(StdaError, match=message):
        build_model("vgg8", **kwargs)


def test_weights_are_described_for_the_card():
    assert describe_weights("vgg8", "auto", 3) == "random(seed=3)"
    assert describe_weights("vgg11", "auto", 0) == "imagenet"
    assert describe_weights("vgg16", "/x/teacher.safetensors", 0) == "file:teacher.safetensors"
