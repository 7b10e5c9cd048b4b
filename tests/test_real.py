"""The real-image folder: both layouts, validation errors that name the problem, and inspect."""

from __future__ import annotations

import csv
import shutil

import pytest
from PIL import Image

from stda_hf.core.errors import StdaError
from stda_hf.data.inspect import inspect_folder
from stda_hf.data.real import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, read_real_folder


def _rewrite_metadata(root, edit):
    path = root / "metadata.csv"
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames), list(reader)
    fields, rows = edit(fields, rows)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_reads_isic_layout_with_masks_and_provenance(phantom_real_session):
    folder = read_real_folder(phantom_real_session)
    assert folder.layout == "isic"
    assert len(folder) == 60
    assert {im.label for im in folder.images} == {"benign", "malignant"}
    assert all(im.mask_path is not None and im.mask_path.is_file() for im in folder.images)
    first = folder.images[0]
    assert first.copyright_license == "CC-0" and "phantom" in first.attribution
    assert first.lesion_id and first.patient_id
    assert "skin_type" in first.extra


def test_reads_imagefolder_layout(tmp_path):
    for label in ("benign", "malignant"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / label / f"{label}_{i}.png")
    folder = read_real_folder(tmp_path)
    assert folder.layout == "imagefolder"
    assert [im.label for im in folder.images].count("malignant") == 2
    assert folder["benign_1"].copyright_license == "unknown"


def _drop_columns(*names):
    return lambda f, r: (
        [c for c in f if c not in names],
        [{k: v for k, v in row.items() if k not in names} for row in r],
    )


def test_missing_needed_columns_are_named(phantom_real):
    _rewrite_metadata(phantom_real, _drop_columns("diagnosis_1"))
    with pytest.raises(StdaError, match=r"lacks column\(s\) \['diagnosis_1'\]"):
        read_real_folder(phantom_real)


def test_provenance_columns_are_optional_and_absent_means_unknown(phantom_real):
    _rewrite_metadata(phantom_real, _drop_columns(*OPTIONAL_COLUMNS))
    folder = read_real_folder(phantom_real)
    assert len(folder) == 60
    im = folder.images[0]
    assert (im.lesion_id, im.patient_id) == ("", "")
    assert (im.copyright_license, im.attribution) == ("unknown", "unknown")


def test_unknown_diagnosis_names_line_and_valid_values(phantom_real):
    def edit(f, rows):
        rows[2]["diagnosis_1"] = "Maybe"
        return f, rows

    _rewrite_metadata(phantom_real, edit)
    with pytest.raises(StdaError, match=r"line 4: unknown diagnosis_1 'Maybe'.*Benign"):
        read_real_folder(phantom_real)


def test_duplicate_id_is_refused(phantom_real):
    _rewrite_metadata(phantom_real, lambda f, rows: (f, [*rows, rows[0]]))
    with pytest.raises(StdaError, match="duplicate image id"):
        read_real_folder(phantom_real)


def test_every_missing_image_file_is_named(phantom_real):
    victims = sorted((phantom_real / "images").iterdir())[5:8]
    for victim in victims:
        victim.unlink()
    with pytest.raises(StdaError, match="3 image file\\(s\\) not found") as err:
        read_real_folder(phantom_real)
    assert all(v.stem in str(err.value) for v in victims)


def test_masks_named_the_isic_way_are_matched_and_strays_listed(phantom_real):
    masks = sorted((phantom_real / "masks").iterdir())
    masks[0].rename(masks[0].with_name(f"{masks[0].stem}_segmentation.png"))
    masks[1].rename(masks[1].with_name(f"{masks[1].stem}_Segmentation.png"))
    stray = phantom_real / "masks" / "NOT_AN_IMAGE_segmentation.png"
    shutil.copy(masks[2], stray)
    folder = read_real_folder(phantom_real)
    assert folder[masks[0].stem].mask_path.name == f"{masks[0].stem}_segmentation.png"
    assert folder[masks[1].stem].mask_path.name == f"{masks[1].stem}_Segmentation.png"
    assert sum(im.mask_path is not None for im in folder.images) == 60
    assert "NOT_AN_IMAGE" in folder.left_out[str(stray)]


def test_unsafe_id_is_refused(phantom_real):
    def edit(f, rows):
        rows[0]["isic_id"] = "../../etc/passwd"
        return f, rows

    _rewrite_metadata(phantom_real, edit)
    with pytest.raises(StdaError, match="not a safe file name"):
        read_real_folder(phantom_real)


def test_indeterminate_images_are_kept_but_not_labelled(phantom_real):
    def edit(f, rows):
        rows[0]["diagnosis_1"] = "Indeterminate"
        return f, rows

    _rewrite_metadata(phantom_real, edit)
    folder = read_real_folder(phantom_real)
    assert len(folder) == 60 and len(folder.labelled) == 59


def test_not_a_real_folder(tmp_path):
    with pytest.raises(StdaError, match="not a real-image folder"):
        read_real_folder(tmp_path)
    with pytest.raises(StdaError, match="does not exist"):
        read_real_folder(tmp_path / "nope")


def test_subset_needs_splits_and_valid_names(phantom_real):
    folder = read_real_folder(phantom_real)
    train_benign = folder.subset("train", "benign")
    assert train_benign and all(im.label == "benign" for im in train_benign)
    with pytest.raises(StdaError, match="unknown split 'dev'"):
        folder.subset("dev")
    (phantom_real / "splits.csv").unlink()
    with pytest.raises(StdaError, match="run `stda split"):
        read_real_folder(phantom_real).subset("train")


def test_inspect_counts_and_reports_bad_files(phantom_real):
    bad = sorted((phantom_real / "images").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:100])
    report = inspect_folder(phantom_real)
    assert sum(report.per_class.values()) == 60
    assert report.per_license == {"CC-0": 60}
    assert sum(sum(c.values()) for c in report.per_split.values()) == 60
    assert list(report.bad) == [str(bad)]
    assert report.sizes["width_max"] == 32
    text = report.format()
    assert "bad files:   1" in text and "validation" in text


def test_required_columns_are_isic_cli_names():
    assert REQUIRED_COLUMNS[0] == "isic_id" and "diagnosis_1" in REQUIRED_COLUMNS


def test_copied_folder_is_independent(phantom_real, phantom_real_session):
    shutil.rmtree(phantom_real / "masks")
    assert read_real_folder(phantom_real).images[0].mask_path is None
    assert read_real_folder(phantom_real_session).images[0].mask_path is not None


def test_two_files_for_one_id_are_refused_naming_both(phantom_real):
    images = phantom_real / "images"
    shutil.copy(images / "PHANTOM_0000009.jpg", images / "PHANTOM_0000010.png")
    with pytest.raises(StdaError, match=r"PHANTOM_0000010\.jpg and .*PHANTOM_0000010\.png"):
        read_real_folder(phantom_real)


def test_an_image_without_a_metadata_row_is_left_out_with_the_reason(phantom_real):
    Image.new("RGB", (32, 32)).save(phantom_real / "images" / "EXTRA_1.png")
    folder = read_real_folder(phantom_real)
    assert folder.left_out == {str(phantom_real / "images" / "EXTRA_1.png"): "no row in metadata.csv"}
    assert "EXTRA_1" not in folder


def test_imagefolder_class_folders_in_any_case_and_pillow_formats(tmp_path):
    img = Image.new("RGB", (32, 32), (200, 150, 120))
    (tmp_path / "Benign").mkdir()
    (tmp_path / "MALIGNANT").mkdir()
    (tmp_path / "other").mkdir()
    img.save(tmp_path / "Benign" / "a.gif")
    img.save(tmp_path / "Benign" / "b", format="PNG")
    img.save(tmp_path / "MALIGNANT" / "c.jfif", format="JPEG")
    (tmp_path / "MALIGNANT" / "Thumbs.db").write_bytes(b"\x00" * 16)
    folder = read_real_folder(tmp_path)
    assert [(im.isic_id, im.label) for im in folder.images] == [
        ("a", "benign"),
        ("b", "benign"),
        ("c", "malignant"),
    ]
    assert folder.left_out == {
        str(tmp_path / "MALIGNANT" / "Thumbs.db"): "not an image file Pillow can read",
        str(tmp_path / "other"): "not a class folder (benign, malignant, in any case)",
    }


def test_unsplit_lists_labelled_images_added_after_split(phantom_real):
    splits = phantom_real / "splits.csv"
    lines = splits.read_text().splitlines(keepends=True)
    splits.write_text("".join(lines[:-1]))
    missing = lines[-1].split(",")[0]
    assert [im.isic_id for im in read_real_folder(phantom_real).unsplit()] == [missing]
