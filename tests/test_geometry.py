"""One geometry for every stage: crop (default), pad or squash, the same for an image and its mask.

Real dermoscopy is 3:2 or 4:3; the phantoms are square (where every mode gives the same pixels). The tests draw a
3:2 image with a centred round lesion and its mask, and follow them through generate, train, the saved image
processor, label, explain and package.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import TINY_VGG8
from PIL import Image, ImageDraw

from stda_hf.core.errors import StdaError
from stda_hf.data.images import (
    PAD_FILL,
    RESIZE_MODES,
    bound_side,
    check_resize,
    fit_image,
    fit_mask,
    load_image,
)

W, H, R = 96, 64, 20  # a 3:2 frame and the radius of its centred lesion
SKIN, LESION = (210, 160, 130), (70, 40, 30)


def lesion_image(w: int = W, h: int = H, r: int = R) -> tuple[Image.Image, Image.Image]:
    """A skin-coloured ``w`` x ``h`` RGB image with a dark centred disc of radius ``r``, and its 0/255 mask.

    The left and right edge columns are coloured (red, blue) so a test can see whether the whole frame was kept.
    """
    img = Image.new("RGB", (w, h), SKIN)
    mask = Image.new("L", (w, h), 0)
    disc = (w / 2 - r, h / 2 - r, w / 2 + r - 1, h / 2 + r - 1)
    ImageDraw.Draw(img).ellipse(disc, fill=LESION)
    ImageDraw.Draw(mask).ellipse(disc, fill=255)
    ImageDraw.Draw(img).rectangle((0, 0, 3, h - 1), fill=(255, 0, 0))
    ImageDraw.Draw(img).rectangle((w - 4, 0, w - 1, h - 1), fill=(0, 0, 255))
    return img, mask


def extent(mask: np.ndarray) -> tuple[int, int]:
    """(width, height) of the bounding box of a boolean mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def dark(img: Image.Image) -> np.ndarray:
    """Where an RGB image shows the lesion: pixels nearer the lesion colour than to the skin, the edges or the fill."""
    colours = np.array([LESION, SKIN, (255, 0, 0), (0, 0, 255), PAD_FILL], dtype=np.float64)
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64)[..., None, :]
    return np.abs(pixels - colours).sum(-1).argmin(-1) == 0


# ----------------------------------------------------------------------------------------------------------------
# The geometry


def test_crop_keeps_a_round_lesion_round():
    _, mask = lesion_image()
    w, h = extent(np.asarray(fit_mask(mask, 32, "crop")) > 127)
    assert abs(w / h - 1) < 0.1 and w >= 12  # 40 px of 64 -> 20 px of 32


def test_squash_makes_a_round_lesion_an_ellipse_as_before():
    _, mask = lesion_image()
    w, h = extent(np.asarray(fit_mask(mask, 32, "squash")) > 127)
    assert abs(w / h - H / W) < 0.1


def test_crop_keeps_the_centre_and_drops_the_sides():
    img, _ = lesion_image()
    out = np.asarray(fit_image(img, 32, "crop"))
    assert out[:, 0, 0].max() < 255 and out[:, -1, 2].max() < 255  # the red and blue edge columns are gone


def test_pad_keeps_the_whole_frame_and_fills_the_bands_with_the_imagenet_mean():
    img, mask = lesion_image()
    out = np.asarray(fit_image(img, 32, "pad"))
    inner = round(H * 32 / W)  # 21 rows of image, centred
    top = (32 - inner) // 2
    assert (out[:top] == PAD_FILL).all() and (out[top + inner :] == PAD_FILL).all()
    assert out[top + inner // 2, 0].tolist() == [255, 0, 0] and out[top + inner // 2, -1].tolist() == [
        0,
        0,
        255,
    ]
    m = np.asarray(fit_mask(mask, 32, "pad"))
    assert (m[:top] == 0).all() and (m[top + inner :] == 0).all()
    w, h = extent(m > 127)
    assert abs(w / h - 1) < 0.15  # round, at fewer pixels


def test_pad_fill_is_zero_after_imagenet_normalisation():
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    assert np.abs((np.array(PAD_FILL) / 255 - mean) / std).max() < 0.01


def test_squash_is_the_old_resize_bit_for_bit():
    img, mask = lesion_image()
    for resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
        old = img.resize((32, 32), resample)
        assert np.array_equal(np.asarray(fit_image(img, 32, "squash", resample)), np.asarray(old))
    old_mask = mask.resize((32, 32), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(fit_mask(mask, 32, "squash")), np.asarray(old_mask))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_mask_and_image_stay_aligned(mode):
    img, mask = lesion_image()
    assert iou(dark(fit_image(img, 32, mode)), np.asarray(fit_mask(mask, 32, mode)) > 127) > 0.9


def test_a_mask_in_another_geometry_than_its_image_is_misaligned():
    """The alignment measure above can fail: a squashed mask does not sit on a cropped image's lesion."""
    img, mask = lesion_image()
    assert iou(dark(fit_image(img, 32, "crop")), np.asarray(fit_mask(mask, 32, "squash")) > 127) < 0.8


def test_a_square_image_gives_the_same_pixels_in_every_mode():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    squash = np.asarray(fit_image(img, 32, "squash"))
    assert all(np.array_equal(np.asarray(fit_image(img, 32, m)), squash) for m in ("crop", "pad"))


def test_a_non_square_target_is_filled_exactly():
    img, _ = lesion_image()
    assert all(fit_image(img, (40, 24), m).size == (40, 24) for m in RESIZE_MODES)


def test_bound_side_keeps_the_aspect_and_never_enlarges():
    img, _ = lesion_image()
    assert bound_side(img, 48).size == (48, 32)
    assert bound_side(img, 200) is img


def test_a_bad_mode_names_the_value_and_the_choices():
    with pytest.raises(
        StdaError, match=r"--resize 'stretch' is not a resize mode; choose one of \['crop', 'pad', 'squash'\]"
    ):
        check_resize("stretch")


def test_every_stage_refuses_a_bad_mode_naming_it():
    from stda_hf.generate import GenerateConfig
    from stda_hf.label import LabelConfig
    from stda_hf.models.vgg import Preprocessing
    from stda_hf.training import TrainConfig
    from stda_hf.training.config import check_config

    makers = (
        lambda: GenerateConfig(resize="stretch", weights="random"),
        lambda: check_config(TrainConfig(resize="stretch")),
        lambda: LabelConfig(teacher="runs/x", resize="stretch"),
        lambda: Preprocessing(32, resize="stretch"),
    )
    for make in makers:
        with pytest.raises(StdaError, match="'stretch' is not a resize mode"):
            make()


def test_the_cli_turns_a_bad_mode_into_one_line_and_exit_2(phantom_real, tmp_path, capsys):
    from stda_hf.cli import main

    code = main(["generate", str(phantom_real), "--out", str(tmp_path / "syn"), "--resize", "stretch"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'stretch' is not a resize mode" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# generate


def write_lesion(folder: Path) -> tuple[Path, Path]:
    img, mask = lesion_image()
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / "wide.png")
    mask.save(folder / "wide_mask.png")
    return folder / "wide.png", folder / "wide_mask.png"


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_generate_loads_content_and_mask_in_one_geometry(mode, tmp_path):
    from stda_hf.generate.stage import load_content, load_mask

    image, mask = write_lesion(tmp_path)
    content = load_content(image, 32, mode)
    expected = fit_image(load_image(image), 32, mode, Image.Resampling.BICUBIC)
    assert torch.equal(content, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 255)
    shown = Image.fromarray((content.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert iou(dark(shown), load_mask(mask, 32, mode).numpy()) > 0.85


def test_generate_records_the_mode_in_its_settings_and_ids(phantom_real, tmp_path):
    from stda_hf.generate import GenerateConfig, generate

    fast = {"iterations": 2, "size": 32, "weights": "random", "per_content": 1, "limit": 2, "batch": 2}
    fast |= {"max_failed_share": 1.0}
    generate(phantom_real, tmp_path / "pad", GenerateConfig(**fast, resize="pad"))
    generate(phantom_real, tmp_path / "crop", GenerateConfig(**fast))
    assert yaml.safe_load((tmp_path / "pad" / "generate.yaml").read_text())["resize"] == "pad"
    assert yaml.safe_load((tmp_path / "crop" / "generate.yaml").read_text())["resize"] == "crop"
    ids = {m: {json.loads(x)["id"] for x in (tmp_path / m / "manifest.jsonl").read_text().splitlines()}
           for m in ("pad", "crop")}  # fmt: skip
    assert ids["pad"].isdisjoint(ids["crop"])  # the mode changes pixels, so it is part of every image id


def test_a_synthetic_folder_made_before_the_mode_existed_counts_as_squash(phantom_real, tmp_path):
    from stda_hf.generate import GenerateConfig, generate

    fast = {"iterations": 2, "size": 32, "weights": "random", "per_content": 1, "limit": 1, "batch": 1}
    cfg = GenerateConfig(**fast, max_failed_share=1.0)
    generate(phantom_real, tmp_path / "syn", cfg)
    saved = yaml.safe_load((tmp_path / "syn" / "generate.yaml").read_text())
    del saved["resize"]
    (tmp_path / "syn" / "generate.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(StdaError, match=r"resize: 'squash' -> 'crop'"):
        generate(phantom_real, tmp_path / "syn", cfg)


def test_the_dataset_card_shows_the_mode_among_the_generation_settings():
    from stda_hf.dataset.card import engine_settings

    for engine in ("gatys", "arbitrary"):
        assert engine_settings({"engine": engine, "resize": "pad", "size": 32}, engine)["resize"] == "pad"


# ----------------------------------------------------------------------------------------------------------------
# train, the saved image processor, label, explain


def test_evaluation_transform_follows_the_mode():
    from stda_hf.models.vgg import Preprocessing, eval_transform

    img, _ = lesion_image()
    for mode in RESIZE_MODES:
        x = eval_transform(Preprocessing(32, mean=(0, 0, 0), std=(1, 1, 1), resize=mode))(img)
        expected = torch.from_numpy(np.asarray(fit_image(img, 32, mode)).copy()).permute(2, 0, 1) / 255
        assert torch.allclose(x, expected.float(), atol=1e-6)


def test_training_pipeline_resizes_in_the_mode_before_augmentation():
    from stda_hf.models.vgg import Preprocessing, eval_transform
    from stda_hf.training import TrainConfig
    from stda_hf.training.data import build_transforms

    img, _ = lesion_image()
    still = {"rotation": 0.0, "zoom": 0.0, "shear": 0.0, "hflip": False, "vflip": False, "color_jitter": 0.0}
    for mode in ("crop", "pad"):
        pre = Preprocessing(32, resize=mode)
        train = build_transforms(TrainConfig(resize=mode, **still), pre, train=True)
        assert torch.equal(train(img), eval_transform(pre)(img))
        assert not torch.equal(train(img), eval_transform(Preprocessing(32, resize="squash"))(img))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_saved_image_processor_preprocesses_as_the_model_was_trained(mode, tmp_path):
    from transformers import AutoImageProcessor

    from stda_hf.models.vgg import VGG8, Preprocessing, eval_transform, save_model

    pre = Preprocessing(32, resize=mode)
    save_model(VGG8(widths=(4, 8, 8, 16, 16), hidden=(16, 16)), tmp_path, pre)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["resize_mode"] == mode
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    img, _ = lesion_image()
    assert torch.equal(proc(img, return_tensors="pt")["pixel_values"][0], eval_transform(pre)(img))


def test_an_old_preprocessor_config_without_the_mode_squashes(tmp_path):
    from transformers import AutoImageProcessor

    from stda_hf.models.vgg import VGG8, Preprocessing, eval_transform, load_model, save_model

    save_model(VGG8(widths=(4, 8, 8, 16, 16), hidden=(16, 16)), tmp_path, Preprocessing(32, resize="crop"))
    path = tmp_path / "preprocessor_config.json"
    old = json.loads(path.read_text())
    del old["resize_mode"]
    path.write_text(json.dumps(old))
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    img, _ = lesion_image()
    squash = eval_transform(Preprocessing(32, resize="squash"))(img)
    assert proc.resize_mode == "squash" and torch.equal(
        proc(img, return_tensors="pt")["pixel_values"][0], squash
    )
    assert load_model(tmp_path)[1].resize == "squash"


@pytest.fixture(scope="module")
def padded_run(phantom_hub, tmp_path_factory):
    from stda_hf.training import TrainConfig, run_training

    out = tmp_path_factory.mktemp("runs") / "pad"
    run_training(TrainConfig(dataset=str(phantom_hub), output_dir=str(out), **{**TINY_VGG8, "epochs": 1},
                             resize="pad", explain_images=0))  # fmt: skip
    return out


def test_train_records_the_mode_in_its_settings_card_and_image_processor(padded_run):
    assert yaml.safe_load((padded_run / "config.yaml").read_text())["resize"] == "pad"
    assert json.loads((padded_run / "model" / "preprocessor_config.json").read_text())["resize_mode"] == "pad"
    assert "`resize=pad`" in (padded_run / "model" / "README.md").read_text()


def model_card(model: str, mode: str) -> str:
    from stda_hf.models.vgg import Preprocessing
    from stda_hf.training import TrainConfig
    from stda_hf.training.model_card import RunFacts, render_card

    facts = RunFacts(
        config={**vars(TrainConfig(model=model, resize=mode)), "dataset": "me/data"}, layers=["Linear(2, 2)"],
        parameters=6, weights="random(seed=0)", split_sizes={"train": 8, "validation": 4}, best_epoch=1, epochs=1,
        stopped_early=False, validation={}, test=None, preprocessing=Preprocessing(32, resize=mode),
        dataset_license="cc0-1.0",
    )  # fmt: skip
    return render_card(facts, [])


def test_model_card_says_how_the_input_was_resized():
    assert "centre-cropped to 32x32 (`resize=crop`)" in model_card("vgg8", "crop")
    assert "padded with the ImageNet mean colour to 32x32 (`resize=pad`)" in model_card("vgg8", "pad")
    assert "stretched, aspect not kept) to 32x32 (`resize=squash`)" in model_card("vgg8", "squash")


def test_model_card_of_another_transformers_model_says_its_processor_stretches():
    assert "so give it images already padded to a square" in model_card("org/vit-tiny", "pad")
    assert "give it images already" not in model_card("vgg8", "pad")


def test_resuming_a_run_saved_before_the_mode_existed_keeps_squash(padded_run, tmp_path):
    from stda_hf.training import TrainConfig
    from stda_hf.training.run import _check_same_settings

    saved = yaml.safe_load((padded_run / "config.yaml").read_text())
    del saved["resize"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    old = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    with pytest.raises(StdaError, match=r"resize: 'squash' -> 'crop'"):
        _check_same_settings(TrainConfig(**{**old, "resize": "crop"}), tmp_path / "config.yaml")
    _check_same_settings(TrainConfig(**{**old, "resize": "squash"}), tmp_path / "config.yaml")


def test_label_uses_the_teachers_recorded_mode(padded_run):
    from stda_hf.label import LabelConfig
    from stda_hf.label.stage import load_teacher
    from stda_hf.models.vgg import eval_transform

    teacher = load_teacher(LabelConfig(teacher=str(padded_run)))
    img, _ = lesion_image()
    assert teacher.preprocessing.resize == "pad"
    assert torch.equal(teacher.preprocess([img])[0], eval_transform(teacher.preprocessing)(img))
    assert load_teacher(LabelConfig(teacher=str(padded_run), resize="crop")).preprocessing.resize == "crop"


def test_label_records_the_teachers_input_geometry(phantom_real, tmp_path):
    from test_label import fake_synthetic, save_teacher

    from stda_hf.label import LabelConfig, label_synthetic

    syn = fake_synthetic(phantom_real, tmp_path / "syn")
    teacher = save_teacher(tmp_path / "teacher")  # saved with the default mode, crop
    label_synthetic(syn, LabelConfig(teacher=str(teacher), resize="pad"))
    summary = json.loads((syn / "labels_summary.json").read_text())
    assert summary["teacher_input"] == {"image_size": 32, "resize": "pad"}


def test_explain_uses_the_models_recorded_mode(padded_run, phantom_real, tmp_path, monkeypatch):
    import stda_hf.explain.stage as explain_stage
    from stda_hf.explain import ExplainConfig, run_explain

    seen = []
    real = explain_stage.explain_samples

    def spy(*args, resize="squash", **kwargs):
        seen.append(resize)
        return real(*args, resize=resize, **kwargs)

    monkeypatch.setattr(explain_stage, "explain_samples", spy)
    cfg = ExplainConfig(limit=2, grid=0, reference="none", device="cpu")
    run_explain(padded_run, tmp_path / "expl", images=phantom_real, cfg=cfg)
    assert seen and set(seen) == {"pad"}


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_explanations_measure_the_mask_on_the_pixels_the_model_saw(mode):
    from stda_hf.attribution.hook import Sample, _resize_map, explain_samples
    from stda_hf.models.vgg import VGG8, Preprocessing, eval_transform

    torch.manual_seed(0)
    model = VGG8(widths=(4, 8, 8, 16, 16), hidden=(16, 16)).eval()
    pre = Preprocessing(32, resize=mode)
    img, mask = lesion_image()
    sample = Sample(id="wide", image=img, mask=(np.asarray(mask) > 127).astype(np.uint8))
    result = explain_samples(
        model, [sample], eval_transform(pre), pre.mean, pre.std, "gradient", resize=mode
    )[0]
    seen = _resize_map(sample.mask, result.pixels.shape[::-1], mode) > 0
    assert iou(dark(result.input_image), seen) > 0.85


# ----------------------------------------------------------------------------------------------------------------
# package


def widen(real: Path) -> None:
    """Make every image (and its masks) of a real-image folder 3:2: 48 x 32 from 32 x 32 phantoms."""
    for sub, resample in (("images", Image.Resampling.BICUBIC), ("masks", Image.Resampling.NEAREST),
                          ("artifacts", Image.Resampling.NEAREST)):  # fmt: skip
        for path in (real / sub).glob("*"):
            with Image.open(path) as img:
                img.load()
            img.resize((48, 32), resample).save(path)


def rows(hub: Path, split: str) -> list[dict]:
    return [
        r for p in sorted((hub / "data").glob(f"{split}-*.parquet")) for r in pq.read_table(p).to_pylist()
    ]


def test_max_side_bounds_real_images_and_their_masks_keeping_the_aspect(phantom_real, tmp_path):
    from stda_hf.dataset import PackageConfig, package

    widen(phantom_real)
    package(phantom_real, tmp_path / "hub", cfg=PackageConfig(max_side=24))
    train = rows(tmp_path / "hub", "train")
    for row in train:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.size == (24, 16)
        if row["mask"] is not None:
            assert Image.open(io.BytesIO(row["mask"]["bytes"])).size == (24, 16)
    assert any(r["mask"] is not None for r in train)
    assert all(r["copyright_license"] and r["attribution"] and r["isic_id"] for r in train)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "--max-side 24" in card and "24×16" in card


def test_without_max_side_the_original_bytes_are_embedded(phantom_real, tmp_path):
    from stda_hf.dataset import package

    widen(phantom_real)
    package(phantom_real, tmp_path / "hub")
    row = rows(tmp_path / "hub", "train")[0]
    original = next((phantom_real / "images").glob(f"{row['isic_id']}.*"))
    assert row["image"]["bytes"] == original.read_bytes()
    assert "--max-side" not in (tmp_path / "hub" / "README.md").read_text()


def test_max_side_keeps_synthetic_images_byte_for_byte_so_their_digest_holds(tmp_path, phantom_real):
    from conftest import _write_synthetic

    from stda_hf.dataset import PackageConfig, package

    synthetic = _write_synthetic(phantom_real, tmp_path / "syn", n=4)
    package(phantom_real, tmp_path / "hub", synthetic=synthetic, cfg=PackageConfig(max_side=16))
    for row in rows(tmp_path / "hub", "synthetic"):
        assert row["image"]["bytes"] == (synthetic / "images" / f"{row['isic_id']}.jpg").read_bytes()
    assert all(max(Image.open(io.BytesIO(r["image"]["bytes"])).size) == 16
               for r in rows(tmp_path / "hub", "train"))  # fmt: skip


def test_a_bad_max_side_names_the_value():
    from stda_hf.dataset import PackageConfig

    with pytest.raises(StdaError, match="--max-side 8 must be 0"):
        PackageConfig(max_side=8)


def test_the_phantoms_are_square_so_crop_and_squash_agree_on_them(phantom_real):
    first = sorted((phantom_real / "images").glob("*"))[:5]
    for path in first:
        img = load_image(path)
        assert img.width == img.height
        assert np.array_equal(
            np.asarray(fit_image(img, 24, "crop")), np.asarray(fit_image(img, 24, "squash"))
        )
