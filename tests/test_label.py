"""Pseudo-labels: they come from the teacher, thresholds filter, calibration lowers ECE, runs resume."""

from __future__ import annotations

import hashlib
import math
import shutil

import pytest
import torch

from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import append_jsonl, read_jsonl, write_json
from stda_hf.data.real import read_real_folder
from stda_hf.label.stage import (
    LabelConfig,
    cross_fit_ece,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    label_synthetic,
    platt_probs,
)
from stda_hf.models.vgg import VGG8, Preprocessing, save_model

SMALL = {"widths": (4, 4, 8, 8, 8), "hidden": (8, 8), "dropout": 0.0}


def fake_synthetic(real, out, n=10):
    """A synthetic folder per the contract: train benign content x train malignant style (images copied)."""
    folder = read_real_folder(real)
    content, style = folder.subset("train", "benign"), folder.subset("train", "malignant")
    (out / "images").mkdir(parents=True)
    for i in range(n):
        c, s = content[i % len(content)], style[i % len(style)]
        image_id = f"syn_{hashlib.sha256(f'{c.isic_id}{s.isic_id}{i}'.encode()).hexdigest()[:16]}"
        shutil.copy(c.path, out / "images" / f"{image_id}.jpg")
        append_jsonl(
            out / "manifest.jsonl",
            {
                "id": image_id,
                "file": f"images/{image_id}.jpg",
                "content_id": c.isic_id,
                "style_id": s.isic_id,
                "seed": 0,
                "params_hash": "x",
                "content_loss": 1.0,
                "style_loss": 1.0,
                "seconds": 0.1,
                "size": 32,
                "content_license": c.copyright_license,
                "content_attribution": c.attribution,
                "style_license": s.copyright_license,
                "style_attribution": s.attribution,
            },
        )
    digest = hashlib.sha256((real / "splits.csv").read_bytes()).hexdigest()
    write_json(out / "source.json", {"real": str(real), "splits_sha256": digest})
    return out


def save_teacher(folder, bias=None, scale=1.0, seed=0):
    torch.manual_seed(seed)
    model = VGG8(**SMALL)
    last = model.classifier[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        if bias is not None:
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
    save_model(model.eval(), folder, Preprocessing(32))
    return folder


def test_labels_come_from_the_teacher(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn")
    teacher = save_teacher(tmp_path / "teacher", bias=[-3.0, 3.0])
    summary = label_synthetic(syn, LabelConfig(teacher=str(teacher)))
    records = read_jsonl(syn / "labels.jsonl")
    assert len(records) == 10 and {r["label"] for r in records} == {"malignant"}
    r = records[0]
    assert r["probs"][1] == pytest.approx(torch.tensor([-3.0, 3.0]).softmax(0)[1].item(), abs=1e-5)
    assert r["confidence"] == max(r["probs"]) and r["entropy"] > 0 and r["teacher"].startswith("teacher@")
    assert summary.labels == {"malignant": 10}
    assert (syn / "confidence_histogram.png").read_bytes()[:4] == b"\x89PNG"


def test_threshold_filters_what_is_kept(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn")
    teacher = save_teacher(tmp_path / "teacher", bias=[0.0, 0.5])  # confidence 0.62 for every image
    summary = label_synthetic(syn, LabelConfig(teacher=str(teacher), min_confidence=0.8))
    assert summary.images == 10 and summary.kept == 0 and summary.min_confidence == 0.8
    summary = label_synthetic(syn, LabelConfig(teacher=str(teacher), min_confidence=0.6))
    assert summary.kept == 10
    assert sum(sum(v.values()) for v in summary.by_style.values()) == 10


def test_resume_finishes_the_work_without_duplicates(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn")
    teacher = save_teacher(tmp_path / "teacher", scale=3.0)
    label_synthetic(syn, LabelConfig(teacher=str(teacher), batch_size=4))
    full = read_jsonl(syn / "labels.jsonl")
    lines = (syn / "labels.jsonl").read_text().splitlines(keepends=True)
    (syn / "labels.jsonl").write_text("".join(lines[:3]) + lines[3][:20])  # killed mid-append
    label_synthetic(syn, LabelConfig(teacher=str(teacher), batch_size=4))
    resumed = read_jsonl(syn / "labels.jsonl")
    assert sorted(resumed, key=lambda r: r["id"]) == sorted(full, key=lambda r: r["id"])


def test_labels_of_another_teacher_are_not_mixed(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn", n=3)
    label_synthetic(syn, LabelConfig(teacher=str(save_teacher(tmp_path / "a", seed=1))))
    with pytest.raises(StdaError, match="delete it to relabel"):
        label_synthetic(syn, LabelConfig(teacher=str(save_teacher(tmp_path / "b", seed=2))))


def test_calibration_lowers_ece_on_phantom_validation(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn", n=4)
    teacher = save_teacher(tmp_path / "teacher", scale=200.0)  # random features, huge logits: overconfident
    summary = label_synthetic(syn, LabelConfig(teacher=str(teacher), calibrate=True))
    cal = summary.calibration
    assert cal["method"] == "platt" and summary.calibration_method == "platt"
    assert cal["temperature"] > 1.0
    assert cal["ece_after"] < cal["ece_before"]
    assert cal["ece_after_on"]  # where ECE after was measured (held out when validation allows)
    assert (syn / "calibration.json").is_file()


def test_temperature_and_ece_on_known_inputs():
    torch.manual_seed(0)
    targets = torch.randint(0, 2, (2000,))
    true_logit = torch.randn(2000) + 0.8 * (2 * targets - 1)
    logits = torch.stack([-true_logit, true_logit], 1) * 4  # calibrated at T=4 by construction
    assert fit_temperature(logits, targets) == pytest.approx(4.0, rel=0.15)
    assert expected_calibration_error(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0])) == 0.0
    assert expected_calibration_error(torch.tensor([[0.0, 1.0]]), torch.tensor([0])) == pytest.approx(1.0)


def test_platt_scaling_removes_a_class_weighting_shift_that_a_temperature_cannot():
    torch.manual_seed(0)
    targets = (torch.rand(4000) < 0.2).long()  # imbalanced, as ISIC is
    x = torch.randn(4000) + 0.5 * (2 * targets - 1)  # classes N(+-0.5, 1): true log-odds x + log(0.2 / 0.8)
    log_odds = x + math.log(0.2 / 0.8)
    shifted = torch.stack(
        [torch.zeros(4000), log_odds + math.log(4.0)], 1
    )  # weighted loss: + log prior ratio
    a, b = fit_platt(shifted, targets)
    assert a == pytest.approx(1.0, abs=0.1) and b == pytest.approx(-math.log(4.0), abs=0.2)
    t = fit_temperature(shifted, targets)
    ece_t = expected_calibration_error((shifted / t).softmax(-1), targets)
    ece_platt = expected_calibration_error(platt_probs(shifted, a, b), targets)
    assert ece_platt < ece_t / 2


def test_cross_fitted_ece_measures_each_half_with_the_other_halfs_fit():
    torch.manual_seed(1)
    targets = torch.randint(0, 2, (60,))
    logits = torch.stack([torch.zeros(60), 3 * torch.randn(60) + (2 * targets - 1)], 1)
    held_out = cross_fit_ece(logits, targets)
    in_sample = expected_calibration_error(platt_probs(logits, *fit_platt(logits, targets)), targets)
    assert math.isfinite(held_out) and held_out != pytest.approx(in_sample)
    assert math.isnan(cross_fit_ece(logits[:3], torch.tensor([1, 1, 1])))  # one class: nothing to fit


def test_teacher_trained_on_validation_images_is_refused(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn", n=2)
    run = tmp_path / "run"
    save_teacher(run / "model")
    val_id = read_real_folder(phantom_real).subset("validation")[0].isic_id
    (run / "train_ids.txt").write_text(f"{val_id}\n")
    with pytest.raises(StdaError, match="trained on 1 validation/test image"):
        label_synthetic(syn, LabelConfig(teacher=str(run)))


def test_missing_or_incompatible_teacher_is_a_clear_error(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn", n=2)
    with pytest.raises(StdaError, match=r"no config\.json"):
        label_synthetic(syn, LabelConfig(teacher=str(tmp_path / "nothing")))
    three = tmp_path / "three"
    save_model(VGG8(num_classes=3, **SMALL), three, Preprocessing(32))
    with pytest.raises(StdaError, match="must predict exactly"):
        label_synthetic(syn, LabelConfig(teacher=str(three)))
    with pytest.raises(StdaError, match="--teacher is required"):
        LabelConfig()
    with pytest.raises(StdaError, match=r"manifest\.jsonl is missing"):
        label_synthetic(tmp_path, LabelConfig(teacher=str(three)))


def _mark_failed(syn, verdicts: dict[int, str]) -> None:
    """Give manifest lines ``i`` the quality verdict ``verdicts[i]`` (the rest ``ok``), as generate records it."""
    records = read_jsonl(syn / "manifest.jsonl")
    (syn / "manifest.jsonl").unlink()
    for i, r in enumerate(records):
        append_jsonl(syn / "manifest.jsonl", {**r, "quality": {"verdict": verdicts.get(i, "ok")}})


def test_images_that_failed_the_quality_gate_are_left_out_and_counted(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn")
    _mark_failed(syn, {0: "unchanged", 3: "content_lost", 4: "content_lost"})
    summary = label_synthetic(syn, LabelConfig(teacher=str(save_teacher(tmp_path / "teacher"))))
    assert summary.images == 7 and len(read_jsonl(syn / "labels.jsonl")) == 7
    assert summary.left_out_failed == {"content_lost": 2, "unchanged": 1}


def test_keep_failed_labels_every_image(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn")
    _mark_failed(syn, {0: "unchanged"})
    summary = label_synthetic(syn, LabelConfig(teacher=str(save_teacher(tmp_path / "t")), keep_failed=True))
    assert summary.images == 10 and summary.left_out_failed == {}
