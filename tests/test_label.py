"""Pseudo-labels: they come from the teacher, thresholds filter, calibration lowers ECE, runs resume."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch

from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import append_jsonl, read_jsonl, write_json
from stda_hf.data.real import read_real_folder
from stda_hf.label.stage import (
    LabelConfig,
    calibration_from_logits,
    cross_fit_ece,
    ece_interval,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    flipped_labels,
    label_synthetic,
    misordered,
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


@pytest.fixture(scope="module")
def real_large(tmp_path_factory):
    """160 phantoms split with a quarter for validation: 20 benign and 16 malignant there (do not modify)."""
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.split import SplitConfig, make_splits

    root = tmp_path_factory.mktemp("label-large") / "real"
    make_phantoms(root, PhantomConfig(n=160, size=32, seed=0))
    make_splits(root, SplitConfig(seed=0, val=0.25))
    return root


def test_calibration_lowers_ece_on_phantom_validation(real_large, tmp_path):
    syn = fake_synthetic(real_large, tmp_path / "syn", n=4)
    teacher = save_teacher(tmp_path / "teacher", scale=200.0)  # random features, huge logits: overconfident
    summary = label_synthetic(syn, LabelConfig(teacher=str(teacher), calibrate=True))
    cal = summary.calibration
    assert cal["method"] == "platt" and summary.calibration_method == "platt"
    assert cal["temperature"] > 1.0
    assert cal["ece_after"] < cal["ece_before"]
    assert cal["ece_after_on"] == "held-out halves of the validation split (cross-fit)"
    assert cal["ece_before_ci"][0] <= cal["ece_before"] <= cal["ece_before_ci"][1]
    assert (syn / "calibration.json").is_file()


def test_the_log_names_where_the_ece_after_calibration_was_measured(real_large, tmp_path, caplog):
    syn = fake_synthetic(real_large, tmp_path / "syn", n=2)
    teacher = save_teacher(tmp_path / "teacher", scale=200.0)
    with caplog.at_level("INFO", logger="stda_hf.label"):
        label_synthetic(syn, LabelConfig(teacher=str(teacher), calibrate=True))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Platt scale")]
    assert len(lines) == 1 and "(after: on held-out halves of the validation split (cross-fit))" in lines[0]
    assert "(held out)" not in caplog.text


def test_cli_label_says_calibration_was_not_applied_and_why(phantom_real, tmp_path, capsys):
    from stda_hf.cli import main

    syn = fake_synthetic(phantom_real, tmp_path / "syn", n=2)
    teacher = save_teacher(tmp_path / "teacher", scale=200.0)
    assert main(["label", str(syn), "--teacher", str(teacher), "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "not calibrated: validation holds 2 benign, 7 malignant; calibration needs 10 of each class" in out
    assert "Platt scale" not in out


def test_a_label_turned_round_by_calibration_is_counted(real_large, tmp_path):
    syn = fake_synthetic(real_large, tmp_path / "syn", n=10)
    teacher = save_teacher(tmp_path / "teacher", scale=200.0)
    summary = label_synthetic(syn, LabelConfig(teacher=str(teacher), calibrate=True))
    records = read_jsonl(syn / "labels.jsonl")
    turned = sum(r["uncalibrated_label"] != r["label"] for r in records)
    assert sum(summary.flipped_by_calibration.values()) == turned
    assert all("uncalibrated_label" in r for r in records)


def test_flipped_labels_counts_each_direction():
    records = [
        {"label": "malignant", "uncalibrated_label": "benign"},
        {"label": "malignant", "uncalibrated_label": "benign"},
        {"label": "benign", "uncalibrated_label": "malignant"},
        {"label": "benign", "uncalibrated_label": "benign"},
        {"label": "benign"},  # not calibrated: nothing to turn
    ]
    assert flipped_labels(records) == {"benign->malignant": 2, "malignant->benign": 1}


def test_too_few_validation_images_of_a_class_fall_back_to_no_calibration(phantom_real, tmp_path, caplog):
    syn = fake_synthetic(phantom_real, tmp_path / "syn", n=4)  # validation: 2 benign, 7 malignant
    teacher = save_teacher(tmp_path / "teacher", scale=200.0)
    summary = label_synthetic(syn, LabelConfig(teacher=str(teacher), calibrate=True))
    saved = json.loads((syn / "calibration.json").read_text())
    assert saved["method"] == "none" and saved["fallback"] == "too_few"
    assert "calibration needs 10 of each class" in saved["reason"]
    assert summary.calibration_method == "none" and summary.flipped_by_calibration == {}
    assert [r.message for r in caplog.records if "not calibrating" in r.message] == [
        f"not calibrating: {saved['reason']}; labelling with the teacher's own probabilities"
    ]
    assert all(r["teacher"].endswith("|T=1") for r in read_jsonl(syn / "labels.jsonl"))


def _separable(n=40, overlap=0, seed=0):
    """Validation logits of a teacher that puts all but ``overlap`` images of each class on their own side."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    margin = (2 * y - 1) * (1.0 + torch.rand(n, generator=g))
    margin[:overlap] = -margin[:overlap]  # these cross the boundary
    return torch.stack([torch.zeros(n), margin], 1), y


def test_perfect_separation_warns_and_falls_back_recording_the_fit(caplog):
    z, y = _separable(overlap=0)
    cal = calibration_from_logits(z, y)
    assert cal["method"] == "none" and cal["fallback"] == "separation" and cal["misordered"] == 0
    assert "separates validation perfectly" in cal["reason"] and "not calibrating" in caplog.text
    assert cal["fitted_scale"] is None or cal["fitted_scale"] > 10  # what the fit would have used
    assert (cal["scale"], cal["bias"]) == (1.0, 0.0)


def test_separation_but_for_one_image_falls_back_too():
    cal = calibration_from_logits(*_separable(overlap=1))
    assert cal["fallback"] == "separation" and cal["misordered"] == 1
    assert "but for one image" in cal["reason"]


def test_overlapping_classes_are_calibrated():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(80) % 2
    z = torch.stack([torch.zeros(80), 3 * ((2 * y - 1) * 0.5 + torch.randn(80, generator=g))], 1)
    cal = calibration_from_logits(z, y)
    assert cal["method"] == "platt" and cal["misordered"] > 1 and cal["scale"] < 1.0


def test_misordered_counts_the_fewest_images_on_the_wrong_side():
    def count(margins, labels):
        return misordered(
            torch.stack([torch.zeros(len(margins)), torch.tensor(margins)], 1), torch.tensor(labels)
        )

    assert count([-2.0, -1.0, 1.0, 2.0], [0, 0, 1, 1]) == 0
    assert count([-2.0, 1.5, 1.0, 2.0], [0, 0, 1, 1]) == 1
    assert count([-2.0, -1.0, 1.0, 2.0], [1, 1, 0, 0]) == 2  # reversed: best cut puts all on one side
    assert count([1.0, 1.0], [0, 1]) == 1


def test_ece_interval_covers_the_estimate_and_shows_the_small_sample_floor():
    rng = torch.Generator().manual_seed(0)
    small_p = 0.5 + 0.5 * torch.rand(30, generator=rng)
    small_y = (torch.rand(30, generator=rng) < small_p).long()  # perfectly calibrated for class 1
    small = ece_interval(torch.stack([1 - small_p, small_p], 1), small_y)
    big_p = 0.5 + 0.5 * torch.rand(3000, generator=rng)
    big_y = (torch.rand(3000, generator=rng) < big_p).long()
    big = ece_interval(torch.stack([1 - big_p, big_p], 1), big_y)
    assert small["ece_ci"][0] <= small["ece"] <= small["ece_ci"][1]
    assert 0.08 < small["ece_if_calibrated"] < 0.22  # the binned estimator reads ~0.15 for a calibrated model
    assert big["ece_if_calibrated"] < 0.04 and big["ece"] < 0.05
    assert big["ece_ci"][1] - big["ece_ci"][0] < (small["ece_ci"][1] - small["ece_ci"][0]) / 3


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


def _card(real, syn, tmp_path):
    from stda_hf.dataset import package

    package(real, tmp_path / "hub", synthetic=syn)
    return " ".join((tmp_path / "hub" / "README.md").read_text().split())


def test_card_says_calibration_was_asked_for_and_not_applied_and_why(phantom_real, tmp_path):
    syn = fake_synthetic(phantom_real, tmp_path / "syn", n=4)
    teacher = save_teacher(tmp_path / "teacher", scale=200.0)
    label_synthetic(syn, LabelConfig(teacher=str(teacher), calibrate=True))
    text = _card(phantom_real, syn, tmp_path)
    assert "Calibration was asked for but **not applied**: validation holds 2 benign, 7 malignant" in text
    assert "ran without `--calibrate`" not in text


def test_card_gives_the_ece_interval_and_the_labels_calibration_turned_round(real_large, tmp_path):
    syn = fake_synthetic(real_large, tmp_path / "syn", n=6)
    teacher = save_teacher(tmp_path / "teacher", scale=200.0)
    summary = label_synthetic(syn, LabelConfig(teacher=str(teacher), calibrate=True))
    text = _card(real_large, syn, tmp_path)
    low, high = summary.calibration["ece_after_ci"]
    assert f"95 % bootstrap interval {low:.3f}-{high:.3f}" in text
    assert f"Calibration turned {sum(summary.flipped_by_calibration.values())} pseudo-label(s) round" in text
