"""Splits: grouped by lesion, patient and near-duplicates, stratified, seeded, and leakage refused."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict

import pytest

from stda_hf.core.errors import StdaError
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
