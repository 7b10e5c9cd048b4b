"""Splits: grouped by lesion, patient and near-duplicates, stratified, seeded, and leakage refused."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict

import pytest
from PIL import Image

from stda_hf.core.errors import StdaError
from stda_hf.data.inspect import inspect_folder
from stda_hf.data.real import load_splits, read_real_folder
from stda_hf.data.split import SplitConfig, make_splits, near_duplicate_pairs


def _splits(root):
    with open(root / "splits.csv", newline="") as fh:
        return {r["isic_id"]: r for r in csv.DictReader(fh)}


def test_every_labelled_image_is_assigned_and_no_group_spans_splits(phantom_real_session):
    folder = read_real_folder(phantom_real_session)
    rows = _splits(phantom_real_session)
    assert set(rows) == {im.isic_id for im in folder.labelled}
    for key in ("lesion_id", "patient_id"):
        sides = defaultdict(set)
        for im in folder.images:
            sides[getattr(im, key)].add(rows[im.isic_id]["split"])
        assert all(len(s) == 1 for s in sides.values()), key


def test_stratified_fractions(tmp_path):
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms

    make_phantoms(tmp_path, PhantomConfig(n=300, size=32, seed=2))
    summary = make_splits(tmp_path, SplitConfig(val=0.2, test=0.2, seed=0))
    total = sum(c["benign"] + c["malignant"] for c in summary.values())
    for split, target in (("train", 0.6), ("validation", 0.2), ("test", 0.2)):
        n = summary[split]["benign"] + summary[split]["malignant"]
        assert abs(n / total - target) < 0.06, split
        assert summary[split]["benign"] > 0 and summary[split]["malignant"] > 0


def test_same_seed_same_file_other_seed_other_file(phantom_real):
    before = (phantom_real / "splits.csv").read_bytes()
    make_splits(phantom_real, SplitConfig(seed=0))
    assert (phantom_real / "splits.csv").read_bytes() == before
    make_splits(phantom_real, SplitConfig(seed=1))
    assert (phantom_real / "splits.csv").read_bytes() != before


def test_near_duplicates_are_forced_into_one_group(phantom_real):
    meta = phantom_real / "metadata.csv"
    with open(meta, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    copy = dict(rows[0], isic_id="DUPLICATE_1", lesion_id="OTHER_LESION", patient_id="OTHER_PATIENT")
    shutil.copy(
        phantom_real / "images" / f"{rows[0]['isic_id']}.jpg", phantom_real / "images" / "DUPLICATE_1.jpg"
    )
    with open(meta, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=fields).writerow(copy)
    make_splits(phantom_real, SplitConfig(seed=0))
    rows_out = _splits(phantom_real)
    assert rows_out["DUPLICATE_1"]["group"] == rows_out[rows[0]["isic_id"]]["group"]
    make_splits(phantom_real, SplitConfig(seed=0, phash_distance=-1))
    assert _splits(phantom_real)["DUPLICATE_1"]["group"] == "DUPLICATE_1"


def test_hash_pairs_within_distance_only():
    base = 0x0123456789ABCDEF
    hashes = {"a": base, "b": base ^ 0b111, "c": base ^ 0xFF00FF00FF, "d": base ^ (1 << 63)}
    assert near_duplicate_pairs(hashes, 3) == [("a", "b"), ("a", "d")]
    assert near_duplicate_pairs(hashes, 4) == [("a", "b"), ("a", "d"), ("b", "d")]
    assert near_duplicate_pairs(hashes, 0) == []
    assert near_duplicate_pairs(hashes, -1) == []


def test_hand_edited_split_with_leakage_is_refused(phantom_real):
    folder = read_real_folder(phantom_real)
    rows = _splits(phantom_real)
    lesion = next(
        im.lesion_id for im in folder.images if sum(o.lesion_id == im.lesion_id for o in folder.images) > 1
    )
    victim = next(im.isic_id for im in folder.images if im.lesion_id == lesion)
    rows[victim]["split"] = "test" if rows[victim]["split"] != "test" else "train"
    with open(phantom_real / "splits.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["isic_id", "split", "group"])
        writer.writeheader()
        writer.writerows(rows.values())
    with pytest.raises(StdaError, match=f"leakage: lesion {lesion} has images in"):
        load_splits(read_real_folder(phantom_real))


def test_too_few_groups_is_a_clear_error(tmp_path):
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms

    make_phantoms(tmp_path, PhantomConfig(n=2, size=32))
    with pytest.raises(StdaError, match="would be empty"):
        make_splits(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val": 0}, "--val"),
        ({"val": 0.6, "test": 0.5}, "no training"),
        ({"phash_distance": 9}, "between 0 and 7"),
        ({"floor_per_class": -1}, "--floor-per-class -1"),
        ({"min_per_class": -2}, "--min-per-class -2"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(StdaError, match=match):
        SplitConfig(**kwargs)


def test_bad_image_is_left_out_and_reported(phantom_real):
    victim = sorted((phantom_real / "images").iterdir())[3]
    victim.write_bytes(b"broken")
    make_splits(phantom_real, SplitConfig(seed=0))
    assert victim.stem not in _splits(phantom_real)
    assert str(victim) in (phantom_real / "split_summary.json").read_text()


def _patients(tmp_path, groups):
    """A folder of patient groups ``[(diagnosis, images), ...]`` (ids in order, no near-duplicates hashed)."""
    from stda_hf.data.real import write_metadata

    (tmp_path / "images").mkdir(parents=True)
    rows, k = [], 0
    for p, (label, size) in enumerate(groups):
        for _ in range(size):
            isic_id = f"IMG_{k:04d}"
            Image.new("RGB", (8, 8), (k % 256, k // 256, 7)).save(tmp_path / "images" / f"{isic_id}.png")
            rows.append({"isic_id": isic_id, "diagnosis_1": label, "patient_id": f"P{p}"})
            k += 1
    write_metadata(tmp_path, rows)
    return tmp_path


LARGE_BENIGN_PATIENTS = [("Benign", 8)] * 3 + [("Malignant", 1)] * 24
"""Three benign patients of 8 images: a share-based deal cannot give validation and test one each."""


def test_floor_moves_groups_from_train_so_each_held_out_split_holds_each_class(tmp_path):
    root = _patients(tmp_path, LARGE_BENIGN_PATIENTS)
    for seed in range(5):
        summary = make_splits(root, SplitConfig(seed=seed, phash_distance=-1, floor_per_class=2))
        for split in ("validation", "test"):
            assert summary[split]["benign"] >= 2 and summary[split]["malignant"] >= 2, (seed, split)
        load_splits(read_real_folder(root))  # still no patient on two sides


def test_without_the_floor_the_same_folder_can_leave_a_held_out_split_one_sided(tmp_path):
    root = _patients(tmp_path, LARGE_BENIGN_PATIENTS)
    one_sided = 0
    for seed in range(5):
        summary = make_splits(
            root, SplitConfig(seed=seed, phash_distance=-1, floor_per_class=0, min_per_class=0)
        )
        one_sided += any(summary[s][c] < 2 for s in ("validation", "test") for c in ("benign", "malignant"))
    assert one_sided > 0  # so the test above can fail


def test_a_class_too_small_for_the_floor_is_refused_naming_split_and_class(tmp_path):
    root = _patients(tmp_path, [("Malignant", 1)] * 3 + [("Benign", 1)] * 20)
    with pytest.raises(
        StdaError, match=r"validation 0 malignant, test 1 malignant image\(s\), below the floor of 2"
    ):
        make_splits(root, SplitConfig(seed=0, phash_distance=-1, floor_per_class=2))


def test_classes_below_the_minimum_are_recorded_and_printed_by_split_and_inspect(tmp_path, capsys):
    from stda_hf.cli import main

    root = _patients(tmp_path, [("Malignant", 1)] * 20 + [("Benign", 1)] * 60)
    assert main(["split", str(root), "--phash-distance", "-1", "--min-per-class", "5"]) == 0
    out = capsys.readouterr().out
    assert "too few: validation holds 3 malignant image(s), fewer than 5" in out
    recorded = json.loads((root / "split_summary.json").read_text())["below_minimum"]
    assert recorded == [line for line in out.split("too few: ")[1:] for line in [line.split(" (--")[0]]]
    report = inspect_folder(root, decode=False)
    assert report.below_minimum == recorded and "too few:     validation holds 3 malignant" in report.format()


def test_no_class_is_flagged_when_every_held_out_class_reaches_the_minimum(tmp_path):
    root = _patients(tmp_path, [("Malignant", 1)] * 40 + [("Benign", 1)] * 40)
    make_splits(root, SplitConfig(seed=0, phash_distance=-1, min_per_class=5))
    assert json.loads((root / "split_summary.json").read_text())["below_minimum"] == []
