"""`stda import`: ISIC challenge folders (2016-2020), isic-cli exports and HAM10000 as downloaded.

Every test builds a tiny fake of the source on the fly, with the exact file names, folder names and CSV
headers of the real downloads (docs/data.md), and a few 48x32 images.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from stda_hf.cli import main
from stda_hf.core.errors import StdaError
from stda_hf.data.importers import DEFAULT_TERMS, ImportConfig, import_folder
from stda_hf.data.real import read_real_folder
from stda_hf.data.split import SplitConfig, make_splits


def _image(path, seed, size=(48, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path, size=(48, 32), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = 255
    Image.fromarray(arr, "L").convert(mode).save(path)


def _csv(path, header, rows, delimiter=","):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def _ids(n, start=0):
    return [f"ISIC_{start + i:07d}" for i in range(n)]


def isic2017(root, n=6):
    """ISIC 2017 training as unpacked: images + superpixels + metadata, Part1 masks, Part3 ground truth."""
    ids = _ids(n)
    data = root / "ISIC-2017_Training_Data"
    for i, isic_id in enumerate(ids):
        _image(data / f"{isic_id}.jpg", i)
        _image(data / f"{isic_id}_superpixels.png", 100 + i)
        _mask(root / "ISIC-2017_Training_Part1_GroundTruth" / f"{isic_id}_segmentation.png")
    _csv(data / "ISIC-2017_Training_Data_metadata.csv", ["image_id", "age_approximate", "sex"],
         [[i, "55", "female"] for i in ids])  # fmt: skip
    gt = [[i, "1.0" if k % 3 == 0 else "0.0", "1.0" if k % 3 == 1 else "0.0"] for k, i in enumerate(ids)]
    _csv(
        root / "ISIC-2017_Training_Part3_GroundTruth.csv",
        ["image_id", "melanoma", "seborrheic_keratosis"],
        gt,
    )
    return ids


def ham10000(root, n=8, name="HAM10000_metadata.tab"):
    """HAM10000 from Dataverse: tab-separated metadata, two image folders, doubly nested tschandl masks."""
    ids = _ids(n, start=24306)
    codes = ["nv", "mel", "bkl", "akiec", "bcc", "df", "vasc", "nv"]
    rows = []
    for k, isic_id in enumerate(ids):
        folder = "HAM10000_images_part1" if k < n // 2 else "HAM10000_images_part2"
        _image(root / folder / f"{isic_id}.jpg", k)
        masks = root / "HAM10000_segmentations_lesion_tschandl" / "HAM10000_segmentations_lesion_tschandl"
        _mask(masks / f"{isic_id}_segmentation.png", mode="P" if k == 0 else "L")
        lesion = f"HAM_{k // 2:07d}"  # two images per lesion
        rows.append([lesion, isic_id, codes[k % len(codes)], "histo", "45.0", "male", "back", "vidir_modern"])
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
    _csv(root / name, header, rows, delimiter="\t" if name.endswith(".tab") else ",")
    return ids


def test_isic2017_folder_is_imported_with_labels_masks_and_cc0(tmp_path):
    ids = isic2017(tmp_path / "src")
    summary = import_folder(tmp_path / "src", tmp_path / "real")
    folder = read_real_folder(tmp_path / "real")
    assert [im.isic_id for im in folder.images] == ids
    assert [im.diagnosis_1 for im in folder.images] == ["Malignant", "Benign", "Benign"] * 2
    assert [im.extra["dx"] for im in folder.images[:3]] == ["melanoma", "seborrheic_keratosis", "nevus"]
    assert all(im.mask_path is not None and im.mask_path.name == f"{im.isic_id}.png" for im in folder.images)
    assert {im.copyright_license for im in folder.images} == {"CC-0"}
    assert folder.images[0].attribution == DEFAULT_TERMS["isic2017"][1]
    assert folder.images[0].extra["age_approx"] == "55" and folder.images[0].lesion_id == ""
    assert summary.source == "isic2017" and summary.masks == 6


def test_superpixel_maps_are_left_out_and_listed_not_taken_for_images(tmp_path):
    isic2017(tmp_path / "src")
    summary = import_folder(tmp_path / "src", tmp_path / "real")
    superpixels = [p for p in summary.left_out if p.endswith("_superpixels.png")]
    assert len(superpixels) == 6
    assert not any("superpixels" in p.name for p in (tmp_path / "real" / "images").iterdir())


def test_isic2016_headerless_ground_truth_in_words_and_in_numbers(tmp_path):
    src = tmp_path / "src"
    ids = _ids(4)
    for k, isic_id in enumerate(ids):
        _image(src / "ISBI2016_ISIC_Part3_Training_Data" / f"{isic_id}.jpg", k)
        _mask(src / "ISBI2016_ISIC_Part1_Training_GroundTruth" / f"{isic_id}_Segmentation.png")
    _csv(
        src / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv",
        None,
        [[ids[0], "benign"], [ids[1], "malignant"]],
    )
    _csv(src / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv", None, [[ids[2], "0.0"], [ids[3], "1.0"]])
    summary = import_folder(src, tmp_path / "real")
    folder = read_real_folder(tmp_path / "real")
    assert [im.label for im in folder.images] == ["benign", "malignant", "benign", "malignant"]
    assert [im.extra["challenge_split"] for im in folder.images] == ["Training", "Training", "Test", "Test"]
    assert summary.masks == 4 and summary.license == "CC-0"


def test_isic2018_one_hot_columns_are_read_by_name_with_lesion_groupings(tmp_path):
    src = tmp_path / "src"
    ids = _ids(3, start=24306)
    for k, isic_id in enumerate(ids):
        _image(src / "ISIC2018_Task3_Training_Input" / f"{isic_id}.jpg", k)
    (src / "ISIC2018_Task3_Training_Input" / "ATTRIBUTION.txt").write_text("HAM10000 ...")
    (src / "ISIC2018_Task3_Training_Input" / "LICENSE.txt").write_text("CC-BY-NC")
    header = ["image", "AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC"]  # alphabetical, as one copy has it
    onehot = {ids[0]: "MEL", ids[1]: "NV", ids[2]: "AKIEC"}
    rows = [[i] + ["1.0" if c == onehot[i] else "0.0" for c in header[1:]] for i in ids]
    _csv(
        src / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", header, rows
    )
    _csv(src / "ISIC2018_Task3_Training_LesionGroupings.csv", ["image", "lesion_id", "diagnosis_confirm_type"],
         [[i, "HAM_0000001", "histopathology"] for i in ids])  # fmt: skip
    summary = import_folder(src, tmp_path / "real")
    folder = read_real_folder(tmp_path / "real")
    assert [im.diagnosis_1 for im in folder.images] == ["Malignant", "Benign", "Malignant"]
    assert {im.lesion_id for im in folder.images} == {"HAM_0000001"}
    assert {im.copyright_license for im in folder.images} == {"CC-BY-NC"}
    assert sum(p.endswith(("ATTRIBUTION.txt", "LICENSE.txt")) for p in summary.left_out) == 2


def test_isic2019_downsampled_ids_metadata_lesions_and_ak_indeterminate(tmp_path):
    src = tmp_path / "src"
    ids = ["ISIC_0000017_downsampled", "ISIC_0024306", "ISIC_0053450"]
    for k, isic_id in enumerate(ids):
        _image(src / "ISIC_2019_Training_Input" / f"{isic_id}.jpg", k)
    header = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    onehot = {ids[0]: "SCC", ids[1]: "NV", ids[2]: "AK"}
    _csv(src / "ISIC_2019_Training_GroundTruth.csv", header,
         [[i] + ["1" if c == onehot[i] else "0" for c in header[1:]] for i in ids])  # fmt: skip
    _csv(src / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
         [[ids[0], "", "", "", ""], [ids[1], "80", "lower extremity", "HAM_0000118", "male"],
          [ids[2], "35", "", "BCN_0000001", "female"]])  # fmt: skip
    import_folder(src, tmp_path / "real")
    folder = read_real_folder(tmp_path / "real")
    assert [im.diagnosis_1 for im in folder.images] == ["Malignant", "Benign", "Indeterminate"]
    assert [im.lesion_id for im in folder.images] == ["", "HAM_0000118", "BCN_0000001"]
    assert folder.images[1].extra["anatom_site_general"] == "lower extremity"
    assert len(folder.labelled) == 2


def test_isic2020_v2_gives_patient_and_lesion_ids(tmp_path):
    src = tmp_path / "src"
    ids = _ids(3, start=2637011)
    for k, isic_id in enumerate(ids):
        _image(src / "train" / f"{isic_id}.jpg", k)
    header = ["image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site_general_challenge",
              "diagnosis", "benign_malignant", "target"]  # fmt: skip
    rows = [[ids[0], "IP_7279968", "IL_7972535", "male", "45.0", "head/neck", "unknown", "benign", "0"],
            [ids[1], "IP_7279968", "IL_0000002", "male", "45.0", "torso", "melanoma", "malignant", "1"],
            [ids[2], "IP_0000003", "IL_0000003", "female", "50.0", "torso", "nevus", "benign", "0"]]  # fmt: skip
    _csv(src / "ISIC_2020_Training_GroundTruth_v2.csv", header, rows)
    _csv(src / "ISIC_2020_Training_Duplicates.csv", ["image_name_1", "image_name_2"], [])
    summary = import_folder(src, tmp_path / "real")
    folder = read_real_folder(tmp_path / "real")
    assert [im.patient_id for im in folder.images] == ["IP_7279968", "IP_7279968", "IP_0000003"]
    assert [im.label for im in folder.images] == ["benign", "malignant", "benign"]
    assert folder.images[1].extra["diagnosis"] == "melanoma"
    assert summary.license == "CC-BY-NC" and "2020-ds01" in folder.images[0].attribution


def test_ham10000_tab_metadata_nested_masks_and_default_dx_map(tmp_path):
    ids = ham10000(tmp_path / "src")
    summary = import_folder(tmp_path / "src", tmp_path / "real")
    folder = read_real_folder(tmp_path / "real")
    assert summary.source == "ham10000" and summary.dx_map["akiec"] == "Malignant"
    assert [im.diagnosis_1 for im in folder.images] == ["Benign", "Malignant", "Benign", "Malignant",
                                                        "Malignant", "Benign", "Benign", "Benign"]  # fmt: skip
    assert folder[ids[0]].lesion_id == folder[ids[1]].lesion_id == "HAM_0000000"
    assert folder[ids[0]].extra["dx_type"] == "histo" and folder[ids[0]].extra["dataset"] == "vidir_modern"
    assert summary.masks == 8 and summary.left_out == {}
    assert {im.copyright_license for im in folder.images} == {"CC-BY-NC"}


def test_palette_mask_is_stored_as_a_binary_mask_of_the_lesion(tmp_path):
    ids = ham10000(tmp_path / "src")  # the first mask is a palette PNG
    import_folder(tmp_path / "src", tmp_path / "real")
    stored = np.asarray(Image.open(tmp_path / "real" / "masks" / f"{ids[0]}.png"))
    assert set(np.unique(stored)) == {0, 255} and stored[16, 24] == 255 and stored[0, 0] == 0


def test_dx_map_override_changes_the_class_and_the_printed_map(tmp_path):
    ids = ham10000(tmp_path / "src", name="HAM10000_metadata.csv")
    summary = import_folder(tmp_path / "src", tmp_path / "real", ImportConfig(dx_map="akiec=indeterminate"))
    assert read_real_folder(tmp_path / "real")[ids[3]].diagnosis_1 == "Indeterminate"
    assert "akiec->indeterminate" in summary.format() and "mel->malignant" in summary.format()


def test_lesion_ids_of_ham10000_keep_a_lesion_in_one_split(tmp_path):
    ids = ham10000(tmp_path / "src", n=16)
    import_folder(tmp_path / "src", tmp_path / "real")
    cfg = SplitConfig(seed=0, val=0.25, test=0.25, phash_distance=-1, min_per_class=0, floor_per_class=0)
    make_splits(tmp_path / "real", cfg)
    with open(tmp_path / "real" / "splits.csv", newline="") as fh:
        split = {r["isic_id"]: r["split"] for r in csv.DictReader(fh)}
    assert all(split[ids[2 * k]] == split[ids[2 * k + 1]] for k in range(8))
    assert len(set(split.values())) == 3


def test_isic_cli_export_keeps_each_images_licence_and_attribution(tmp_path):
    src = tmp_path / "src"
    ids = _ids(2, start=9000000)
    for k, isic_id in enumerate(ids):
        _image(src / f"{isic_id}.jpg", k)
    header = ["isic_id", "attribution", "copyright_license", "diagnosis_1", "lesion_id", "patient_id",
              "image_type", "anatom_site_general"]  # fmt: skip
    _csv(src / "metadata.csv", header, [[ids[0], "Hospital A", "CC-BY", "Benign", "IL_1", "IP_1", "dermoscopic", ""],
                                        [ids[1], "Hospital B", "CC-BY-NC", "Malignant", "", "", "", "torso"]])  # fmt: skip
    (src / "attribution.txt").write_text("Hospital A ...")
    summary = import_folder(src, tmp_path / "real")
    folder = read_real_folder(tmp_path / "real")
    assert [(im.copyright_license, im.attribution) for im in folder.images] == [
        ("CC-BY", "Hospital A"),
        ("CC-BY-NC", "Hospital B"),
    ]
    assert folder.images[0].lesion_id == "IL_1" and summary.source == "archive"
    assert "CC-BY-NC" in (tmp_path / "real" / "ATTRIBUTION.md").read_text()


def test_licence_and_attribution_can_be_overridden(tmp_path):
    isic2017(tmp_path / "src", n=3)
    import_folder(tmp_path / "src", tmp_path / "real", ImportConfig(license="CC-BY", attribution="My lab"))
    folder = read_real_folder(tmp_path / "real")
    assert {(im.copyright_license, im.attribution) for im in folder.images} == {("CC-BY", "My lab")}


def test_every_missing_image_is_named_and_skip_missing_imports_the_rest(tmp_path):
    ids = isic2017(tmp_path / "src")
    for isic_id in ids[1:4]:
        (tmp_path / "src" / "ISIC-2017_Training_Data" / f"{isic_id}.jpg").unlink()
    with pytest.raises(StdaError, match="3 image\\(s\\) of the ground truth not found") as err:
        import_folder(tmp_path / "src", tmp_path / "real")
    assert all(i in str(err.value) for i in ids[1:4])
    summary = import_folder(tmp_path / "src", tmp_path / "real2", ImportConfig(skip_missing=True))
    assert len(read_real_folder(tmp_path / "real2")) == 3 and len(summary.missing) == 3


def test_unmatched_masks_and_images_without_ground_truth_are_listed(tmp_path):
    isic2017(tmp_path / "src", n=3)
    _mask(tmp_path / "src" / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0999999_segmentation.png")
    _image(tmp_path / "src" / "ISIC-2017_Training_Data" / "ISIC_0888888.jpg", 7)
    _mask(tmp_path / "src" / "masks" / "ISIC_0000001.png")  # the project's naming: a second mask for one id
    summary = import_folder(tmp_path / "src", tmp_path / "real")
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in summary.left_out.items()}
    assert "not an imported image" in reasons["ISIC_0999999_segmentation.png"]
    assert "no ground-truth row" in reasons["ISIC_0888888.jpg"]
    assert "second mask for ISIC_0000001" in reasons["ISIC_0000001.png"]
    text = summary.format()
    assert all(name in text for name in reasons)


def test_masks_in_a_masks_folder_are_matched_by_id(tmp_path):
    ids = isic2017(tmp_path / "src", n=3)
    for p in (tmp_path / "src" / "ISIC-2017_Training_Part1_GroundTruth").iterdir():
        p.unlink()
    _mask(tmp_path / "src" / "masks" / f"{ids[1]}.png")
    summary = import_folder(tmp_path / "src", tmp_path / "real")
    assert summary.masks == 1 and read_real_folder(tmp_path / "real")[ids[1]].mask_path is not None


def test_mask_of_another_size_than_its_image_is_listed_not_stored(tmp_path):
    ids = isic2017(tmp_path / "src", n=3)
    _mask(
        tmp_path / "src" / "ISIC-2017_Training_Part1_GroundTruth" / f"{ids[0]}_segmentation.png",
        size=(20, 20),
    )
    summary = import_folder(tmp_path / "src", tmp_path / "real")
    assert summary.masks == 2 and not (tmp_path / "real" / "masks" / f"{ids[0]}.png").exists()
    assert any("20x20" in r for r in summary.left_out.values())


def test_max_side_bounds_the_stored_side_keeping_aspect_and_mask_alignment(tmp_path):
    ids = isic2017(tmp_path / "src", n=3)
    big = tmp_path / "src" / "ISIC-2017_Training_Data" / f"{ids[0]}.jpg"
    _image(big, 0, size=(96, 64))
    _mask(
        tmp_path / "src" / "ISIC-2017_Training_Part1_GroundTruth" / f"{ids[0]}_segmentation.png",
        size=(96, 64),
    )
    summary = import_folder(tmp_path / "src", tmp_path / "real", ImportConfig(max_side=40))
    folder = read_real_folder(tmp_path / "real")
    sizes = [Image.open(im.path).size for im in folder.images]
    assert sizes == [(40, 27), (40, 27), (40, 27)] and summary.resized == 3
    assert Image.open(folder[ids[0]].mask_path).size == (40, 27)


def test_without_max_side_the_original_bytes_are_kept(tmp_path):
    ids = isic2017(tmp_path / "src", n=2)
    import_folder(tmp_path / "src", tmp_path / "real")
    original = (tmp_path / "src" / "ISIC-2017_Training_Data" / f"{ids[0]}.jpg").read_bytes()
    assert (tmp_path / "real" / "images" / f"{ids[0]}.jpg").read_bytes() == original


def test_unknown_diagnosis_code_names_the_line_and_the_flag(tmp_path):
    ham10000(tmp_path / "src", name="HAM10000_metadata.csv")
    meta = tmp_path / "src" / "HAM10000_metadata.csv"
    meta.write_text(meta.read_text().replace(",vasc,", ",scc,"))
    with pytest.raises(StdaError, match=r"line 8: diagnosis 'scc'.*--dx-map scc="):
        import_folder(tmp_path / "src", tmp_path / "real")


def test_rerun_resumes_and_other_settings_are_refused(tmp_path):
    isic2017(tmp_path / "src", n=3)
    import_folder(tmp_path / "src", tmp_path / "real")
    before = (tmp_path / "real" / "metadata.csv").read_bytes()
    (tmp_path / "real" / "images" / "ISIC_0000001.jpg").unlink()  # as if interrupted
    import_folder(tmp_path / "src", tmp_path / "real")
    assert (tmp_path / "real" / "metadata.csv").read_bytes() == before
    assert (tmp_path / "real" / "images" / "ISIC_0000001.jpg").is_file()
    with pytest.raises(StdaError, match="other settings"):
        import_folder(tmp_path / "src", tmp_path / "real", ImportConfig(max_side=32))


def test_a_folder_without_known_ground_truth_is_a_clear_error(tmp_path):
    _image(tmp_path / "src" / "x.jpg", 0)
    with pytest.raises(StdaError, match="no ground-truth table"):
        import_folder(tmp_path / "src", tmp_path / "real")


def test_import_report_records_the_map_and_what_was_left_out(tmp_path):
    isic2017(tmp_path / "src", n=2)
    import_folder(tmp_path / "src", tmp_path / "real")
    report = json.loads((tmp_path / "real" / "import_report.json").read_text())
    assert report["dx_map"]["melanoma"] == "Malignant" and len(report["left_out"]) == 2


def test_cli_prints_the_map_and_bad_input_exits_2(tmp_path, capsys):
    isic2017(tmp_path / "src", n=3)
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "real")]) == 0
    out = capsys.readouterr().out
    assert "dx map:      melanoma->malignant" in out and "imported 3 images (isic2017)" in out
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "r2"), "--dx-map", "nevus"]) == 2
    assert "--dx-map 'nevus'" in capsys.readouterr().err


def test_a_ground_truth_cell_that_is_not_0_or_1_names_line_and_column(tmp_path):
    isic2017(tmp_path / "src", n=3)
    gt = tmp_path / "src" / "ISIC-2017_Training_Part3_GroundTruth.csv"
    lines = gt.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",yes"
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(StdaError, match="line 3: column seborrheic_keratosis holds 'yes'; expected 0 or 1"):
        import_folder(tmp_path / "src", tmp_path / "real")


def test_a_ground_truth_table_that_is_not_utf8_is_named_in_the_error(tmp_path):
    isic2017(tmp_path / "src", n=2)
    gt = tmp_path / "src" / "ISIC-2017_Training_Part3_GroundTruth.csv"
    gt.write_bytes(gt.read_bytes() + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(StdaError, match=r"could not be read: .*ISIC-2017_Training_Part3_GroundTruth\.csv"):
        import_folder(tmp_path / "src", tmp_path / "real")


def test_a_quoted_attribution_with_a_line_break_stays_one_row(tmp_path):
    src = tmp_path / "src"
    _image(src / "ISIC_0000001.jpg", 0)
    _csv(src / "metadata.csv", ["isic_id", "diagnosis_1", "attribution", "copyright_license"],
         [["ISIC_0000001", "Benign", "Hospital A\nDepartment B", "CC-BY"]])  # fmt: skip
    import_folder(src, tmp_path / "real")
    assert read_real_folder(tmp_path / "real").images[0].attribution == "Hospital A\nDepartment B"


def test_isic2020_duplicate_pairs_are_kept_in_one_split(tmp_path):
    src = tmp_path / "src"
    ids = _ids(40, start=1000000)
    header = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
              "benign_malignant", "target"]  # fmt: skip
    rows = []
    for k, isic_id in enumerate(ids):
        _image(src / "train" / f"{isic_id}.jpg", k)
        bm = "malignant" if k % 2 else "benign"
        rows.append([isic_id, f"IP_{k:07d}", "male", "50", "torso", "x", bm, str(k % 2)])
    _csv(src / "ISIC_2020_Training_GroundTruth.csv", header, rows)
    pairs = [(ids[0], ids[2]), (ids[1], ids[3]), (ids[4], ids[6])]
    _csv(src / "ISIC_2020_Training_Duplicates.csv", ["image_name_1", "image_name_2"], pairs)
    import_folder(src, tmp_path / "real")
    assert read_real_folder(tmp_path / "real")[ids[2]].extra["duplicate_of"] == ids[0]
    for seed in range(3):
        make_splits(tmp_path / "real", SplitConfig(seed=seed, val=0.25, test=0.25, phash_distance=-1))
        split = read_real_folder(tmp_path / "real").splits()
        assert all(split[a] == split[b] for a, b in pairs), seed
