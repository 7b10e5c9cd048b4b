"""The whole flow on an ISIC 2017 challenge folder as researchers download it, through the ``stda`` CLI.

Real ISIC 2016/2017 images are CC-0, but no verified way to fetch them offline exists here, so the folder is
written from phantoms rendered at ISIC-like aspect ratios (4:3, 3:2 and square, 96 px on the longer side) under
the exact names of the challenge download (``docs/data.md``, "Testing on ISIC-like data"): the Training,
Validation and Test_v2 partitions, each with its ``_Data`` folder of JPEGs, superpixel maps and
``_Data_metadata.csv``, its ``_Part1_GroundTruth`` folder of ``<id>_segmentation.png`` masks, its
``_Part2_GroundTruth`` folder of ``<id>_features.json`` and its ``_Part3_GroundTruth.csv``; the test partition's
masks are not downloaded, as by a researcher who fetched only the classification zips for it.

The flow runs once per module, as a researcher types it: ``stda import --max-side`` -> ``stda split`` ->
``stda package`` + ``stda train`` (the teacher, on real train images only) -> ``stda generate`` with each engine
(quality gate on) -> ``stda label --calibrate`` -> ``stda package`` -> ``datasets.load_dataset``. Each test
then checks one thing the flow promises.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import tiny_train_flags
from PIL import Image

from stda_hf.cli import main
from stda_hf.core.fileio import read_jsonl
from stda_hf.data.importers import DEFAULT_TERMS
from stda_hf.data.phantoms import PhantomConfig, plan_images, render_plan

ISIC2017_LICENSE, ISIC2017_ATTRIBUTION, _ = DEFAULT_TERMS["isic2017"]
PARTITIONS = {"Training": 24, "Validation": 4, "Test_v2": 8}
"""ISIC 2017's partitions (2000, 150 and 600 images in the real download) and how many images each gets here."""
ASPECTS = ("4:3", "3:2", "1:1")  # ISIC 2017: 1022x767 and 6688x4439 (4:3), 3008x2000 (3:2), a few square
LONGER_SIDE = 96  # of the written images; `stda import --max-side` stores them at MAX_SIDE
MAX_SIDE = 80
WITHOUT_MASKS = ("Test_v2",)  # partitions whose Part 1 (segmentation) zip was not downloaded
FLOOR = 2  # `stda split --floor-per-class`: validation and test need 2 images of each class
ENGINES = {"arbitrary": (64, []), "gatys": (32, ["--iterations", "12"])}
"""Per engine, the side `stda generate` writes (64 px for the arbitrary network: its strokes hide a 32 px lesion)
and its other flags."""
MAX_FAILED_SHARE = 1.0  # region-aware, the gate judges the lesion against the style's lesion: at 64 px the
# arbitrary network leaves most lesions `unchanged` by that measure (docs/generate.md), and the flow must go on
PAIRS = 6  # style transfers per engine
RESIZE: list[str] = []  # flags for generate, train and package once they take them, e.g. ["--resize", "crop"]
REGIONS = ["--regions", "lesion-skin"]  # what `auto` resolves to on this folder (its train images have masks)


# ----------------------------------------------------------------------------------------------------------------
# The ISIC 2017 challenge folder


def write_isic2017_challenge(
    root: Path, seed: int = 0, without_masks: tuple[str, ...] = ()
) -> dict[str, dict]:
    """Write an ISIC 2017 challenge folder as unpacked from its zips, from phantoms at ISIC-like aspect ratios.

    Melanoma phantoms become ``melanoma``; benign ones alternate between ``nevus`` and ``seborrheic_keratosis``.
    Each image is its own lesion (ISIC 2017 gives no lesion ids), so only the pixels could group images.

    Parameters
    ----------
    root : Path
        The folder to write (the zips' contents side by side, as a researcher unpacks them).
    seed : int
        The phantoms' seed.
    without_masks : tuple of str
        Partitions written without their ``_Part1_GroundTruth`` folder.

    Returns
    -------
    dict
        ``{isic_id: {"partition", "dx", "size", "mask"}}`` for every image written, ``size`` as
        ``(width, height)``, ``mask`` whether its mask was written.
    """
    cfg = PhantomConfig(
        n=sum(PARTITIONS.values()),
        size=LONGER_SIDE,
        seed=seed,
        aspect=ASPECTS,
        malignant_fraction=0.4,
        max_images_per_lesion=1,
    )
    plans = iter(plan_images(cfg))
    truth: dict[str, dict] = {}
    for partition, count in PARTITIONS.items():
        data = root / f"ISIC-2017_{partition}_Data"
        part1, part2 = (root / f"ISIC-2017_{partition}_Part{k}_GroundTruth" for k in (1, 2))
        masked = partition not in without_masks
        for folder in (data, part1, part2) if masked else (data, part2):
            folder.mkdir(parents=True)
        ground_truth, metadata = [], []
        for _ in range(count):
            view = render_plan(cfg, next(plans))
            isic_id = f"ISIC_{12000 + len(truth):07d}"
            view.image.save(data / f"{isic_id}.jpg", quality=90)
            if masked:
                Image.fromarray(view.mask, "L").save(part1 / f"{isic_id}_segmentation.png")
            _write_task2(
                data / f"{isic_id}_superpixels.png", part2 / f"{isic_id}_features.json", view.image.size
            )
            dx = "melanoma" if view.lesion.malignant else ("nevus", "seborrheic_keratosis")[len(truth) % 2]
            ground_truth.append([isic_id, f"{dx == 'melanoma':.1f}", f"{dx == 'seborrheic_keratosis':.1f}"])
            age = "unknown" if len(truth) % 5 == 0 else str(30 + 5 * (len(truth) % 9))
            metadata.append([isic_id, age, ("female", "male")[len(truth) % 2]])
            truth[isic_id] = {"partition": partition, "dx": dx, "size": view.image.size, "mask": masked}
        header = ["image_id", "melanoma", "seborrheic_keratosis"]
        _write_csv(root / f"ISIC-2017_{partition}_Part3_GroundTruth.csv", header, ground_truth)
        _write_csv(
            data / f"ISIC-2017_{partition}_Data_metadata.csv",
            ["image_id", "age_approximate", "sex"],
            metadata,
        )
    return truth


def _write_task2(superpixels: Path, features: Path, size: tuple[int, int]) -> None:
    """Task 2's files beside each image: a superpixel map (ids in R + 256 G) and its dermoscopic features."""
    width, height = size
    ids = (np.arange(width * height) // 64).reshape(height, width)
    Image.fromarray(np.stack([ids % 256, ids // 256, 0 * ids], -1).astype(np.uint8), "RGB").save(superpixels)
    n = int(ids.max()) + 1
    names = ("pigment_network", "negative_network", "milia_like_cyst", "streaks")
    features.write_text(json.dumps({name: [0] * n for name in names}), encoding="utf-8")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------------------
# The flow, once


@dataclass
class Flow:
    """The folders the flow wrote, what each command printed, and the challenge folder's truth."""

    root: Path
    truth: dict[str, dict]
    printed: dict[str, str]

    @property
    def real(self) -> Path:
        return self.root / "real"

    def synthetic(self, engine: str) -> Path:
        return self.root / f"synthetic-{engine}"

    def hub(self, engine: str) -> Path:
        return self.root / f"hub-{engine}"

    def stda(self, *argv: object, step: str = "") -> None:
        """Run ``stda argv`` as a user types it, keeping what it prints under ``step`` (default: the command)."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([str(a) for a in argv])
        self.printed[step or str(argv[0])] = out.getvalue()
        assert code == 0, f"stda {' '.join(map(str, argv))} exited {code}:\n{out.getvalue()}"


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> Flow:
    """The whole flow, once, as a researcher types it after unpacking the ISIC 2017 zips."""
    root = tmp_path_factory.mktemp("isic2017-flow")
    f = Flow(root, write_isic2017_challenge(root / "ISIC-2017", without_masks=WITHOUT_MASKS), {})
    real, teacher = f.real, root / "teacher"
    f.stda("import", root / "ISIC-2017", "--out", real, "--max-side", MAX_SIDE)
    f.stda("split", real, "--seed", 0, "--floor-per-class", FLOOR)
    f.stda("package", real, "--out", f.hub("real"), *RESIZE, step="package-real")
    f.stda("train", "--dataset", f.hub("real"), "--output-dir", teacher, *tiny_train_flags(epochs=2), *RESIZE)
    for engine, (size, flags) in ENGINES.items():
        syn, pairs = f.synthetic(engine), ["--per-content", 1, "--limit", PAIRS, "--batch", PAIRS]
        generate = ["generate", real, "--out", syn, "--engine", engine, "--size", size, *flags, *pairs]
        generate += ["--max-failed-share", MAX_FAILED_SHARE, *RESIZE, *REGIONS]
        f.stda(*generate, step=f"generate-{engine}")
        f.stda("label", syn, "--teacher", teacher, "--real", real, "--calibrate", step=f"label-{engine}")
        f.stda("package", real, "--synthetic", syn, "--out", f.hub(engine), *RESIZE, step=f"package-{engine}")
    return f


def _metadata(real: Path) -> dict[str, dict[str, str]]:
    with open(real / "metadata.csv", newline="", encoding="utf-8") as fh:
        return {row["isic_id"]: row for row in csv.DictReader(fh)}


def _splits(real: Path) -> dict[str, str]:
    with open(real / "splits.csv", newline="", encoding="utf-8") as fh:
        return {row["isic_id"]: row["split"] for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def loaded(flow, tmp_path_factory) -> dict[str, datasets.DatasetDict]:
    """Each engine's packaged folder, loaded as a user loads it."""
    cache = tmp_path_factory.mktemp("hf-cache")
    return {e: datasets.load_dataset(str(flow.hub(e)), cache_dir=str(cache / e)) for e in ENGINES}


# ----------------------------------------------------------------------------------------------------------------
# import


def test_import_maps_every_ground_truth_row_to_its_diagnosis_and_partition(flow):
    rows = _metadata(flow.real)
    assert sorted(rows) == sorted(flow.truth)
    for isic_id, want in flow.truth.items():
        row = rows[isic_id]
        assert row["dx"] == want["dx"]
        assert row["diagnosis_1"] == ("Malignant" if want["dx"] == "melanoma" else "Benign")
        assert row["challenge_split"] == want["partition"].split("_")[0]  # Test_v2 -> Test
    assert f"imported {len(flow.truth)} images (isic2017)" in flow.printed["import"]


def test_import_records_cc0_and_the_isic_2017_attribution_for_every_image(flow):
    rows = _metadata(flow.real).values()
    assert {(r["copyright_license"], r["attribution"]) for r in rows} == {("CC-0", ISIC2017_ATTRIBUTION)}
    attribution = (flow.real / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert all(isic_id in attribution for isic_id in flow.truth)
    assert (flow.real / "LICENSES" / "cc0-1.0.txt").is_file()


def test_import_bounds_the_side_keeping_each_aspect(flow):
    sizes = Counter()
    for isic_id, want in flow.truth.items():
        with Image.open(flow.real / "images" / f"{isic_id}.jpg") as image:
            w, h = want["size"]  # as written; stored with the longer side bounded and the aspect kept
            assert image.size == (MAX_SIDE, round(MAX_SIDE * h / w)), isic_id
            sizes[image.size] += 1
    assert set(sizes) == {(80, 60), (80, 53), (80, 80)}  # 4:3, 3:2 and square all present


def test_import_stores_each_downloaded_mask_aligned_with_its_resized_image(flow):
    masked = sorted(i for i, want in flow.truth.items() if want["mask"])
    assert sorted(p.stem for p in (flow.real / "masks").iterdir()) == masked
    for isic_id in masked:
        with (
            Image.open(flow.real / "images" / f"{isic_id}.jpg") as image,
            Image.open(flow.real / "masks" / f"{isic_id}.png") as mask,
        ):
            assert mask.size == image.size and set(np.unique(np.asarray(mask))) == {0, 255}
    assert f"masks:       {len(masked)}\n" in flow.printed["import"]


def test_import_lists_the_task_2_files_it_does_not_use_and_nothing_else(flow):
    report = json.loads((flow.real / "import_report.json").read_text(encoding="utf-8"))
    left_out = {Path(p).name for p in report["left_out"]}
    task2 = {f"{i}_superpixels.png" for i in flow.truth} | {f"{i}_features.json" for i in flow.truth}
    assert left_out == task2
    assert report["missing"] == []


# ----------------------------------------------------------------------------------------------------------------
# split


def test_split_gives_validation_and_test_the_floor_of_each_class(flow):
    rows, splits = _metadata(flow.real), _splits(flow.real)
    assert sorted(splits) == sorted(flow.truth)
    for split in ("validation", "test"):
        counts = Counter(rows[i]["diagnosis_1"] for i, s in splits.items() if s == split)
        assert counts["Benign"] >= FLOOR and counts["Malignant"] >= FLOOR, (split, counts)


def test_split_warns_and_records_every_class_below_the_minimum(flow):
    summary = json.loads((flow.real / "split_summary.json").read_text(encoding="utf-8"))
    below = summary["below_minimum"]
    assert below  # 4 and 8 images cannot hold 10 of a class
    assert all(f"too few: {line}" in flow.printed["split"] for line in below)
    for split in ("validation", "test"):
        for cls in ("benign", "malignant"):
            n = summary["counts"][split][cls]
            assert (f"{split} holds {n} {cls} image(s), fewer than 10" in below) == (n < 10)


# ----------------------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_pairs_benign_train_content_with_malignant_train_style(flow, engine):
    rows, splits = _metadata(flow.real), _splits(flow.real)
    records = read_jsonl(flow.synthetic(engine) / "manifest.jsonl")
    assert len(records) == PAIRS and {r["engine"] for r in records} == {engine}
    for r in records:
        assert splits[r["content_id"]] == "train" and rows[r["content_id"]]["diagnosis_1"] == "Benign"
        assert splits[r["style_id"]] == "train" and rows[r["style_id"]]["diagnosis_1"] == "Malignant"
        assert (r["content_license"], r["style_license"]) == (ISIC2017_LICENSE, ISIC2017_LICENSE)


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_writes_images_at_the_configured_size(flow, engine):
    size = ENGINES[engine][0]
    for r in read_jsonl(flow.synthetic(engine) / "manifest.jsonl"):
        with Image.open(flow.synthetic(engine) / r["file"]) as image:
            assert image.size == (size, size), r["file"]


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_judges_every_image_and_records_the_gates_summary(flow, engine):
    records = read_jsonl(flow.synthetic(engine) / "manifest.jsonl")
    summary = json.loads((flow.synthetic(engine) / "generate_summary.json").read_text(encoding="utf-8"))
    verdicts = Counter(r["quality"]["verdict"] for r in records)
    assert summary["verdicts"] == dict(verdicts) and summary["gate_features"] == "vgg19-imagenet"
    failed = sum(verdicts.values()) - verdicts["ok"]
    assert verdicts["ok"] and failed <= MAX_FAILED_SHARE * PAIRS  # the run passed the gate
    for r in records:  # the lesion is judged against its imported mask where there is one
        assert (r["quality"]["lesion_contrast"] is not None) == flow.truth[r["content_id"]]["mask"]
    printed = flow.printed[f"generate-{engine}"]
    assert f"quality gate, all images of this run: ok {verdicts['ok']}," in printed


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_is_region_aware_exactly_where_content_and_style_have_masks(flow, engine):
    for r in read_jsonl(flow.synthetic(engine) / "manifest.jsonl"):
        both = flow.truth[r["content_id"]]["mask"] and flow.truth[r["style_id"]]["mask"]
        assert r["regions"] == ("lesion-skin" if both else "none"), r["id"]
        assert r["quality"]["style_measured"] == ("regions" if both else "whole"), r["id"]


# ----------------------------------------------------------------------------------------------------------------
# label, package and load


@pytest.mark.parametrize("engine", ENGINES)
def test_small_validation_split_is_not_used_to_calibrate_and_says_why(flow, engine):
    calibration = json.loads((flow.synthetic(engine) / "calibration.json").read_text(encoding="utf-8"))
    assert calibration["fallback"] == "too_few"
    assert "not calibrated: validation holds" in flow.printed[f"label-{engine}"]


@pytest.mark.parametrize("engine", ENGINES)
def test_loaded_dataset_holds_each_real_split_and_the_gates_passed_synthetic_images(flow, loaded, engine):
    ds, rows, splits = loaded[engine], _metadata(flow.real), _splits(flow.real)
    for split in ("train", "validation", "test"):
        assert sorted(ds[split]["isic_id"]) == sorted(i for i, s in splits.items() if s == split)
        assert set(ds[split]["origin"]) == {"real"}
        names = ds[split].features["label"].names
        assert [names[k] for k in ds[split]["label"]] == [
            rows[i]["diagnosis_1"].lower() for i in ds[split]["isic_id"]
        ]
    records = {r["id"]: r for r in read_jsonl(flow.synthetic(engine) / "manifest.jsonl")}
    passed = {i for i, r in records.items() if r["quality"]["verdict"] == "ok"}
    assert set(ds["synthetic"]["isic_id"]) == passed and set(ds["synthetic"]["origin"]) == {"synthetic"}


@pytest.mark.parametrize("engine", ENGINES)
def test_no_synthetic_image_derives_from_a_validation_or_test_image(flow, loaded, engine):
    ds = loaded[engine]
    held_out = set(ds["validation"]["isic_id"]) | set(ds["test"]["isic_id"])
    sources = set(ds["synthetic"]["content_isic_id"]) | set(ds["synthetic"]["style_isic_id"])
    assert sources and sources <= set(ds["train"]["isic_id"]) and not sources & held_out


@pytest.mark.parametrize("engine", ENGINES)
def test_every_row_carries_its_isic_id_licence_and_attribution(flow, loaded, engine):
    ds = loaded[engine]
    for split in ("train", "validation", "test"):
        table = ds[split].select_columns(["isic_id", "copyright_license", "attribution"]).to_list()
        assert all(re.fullmatch(r"ISIC_\d{7}", r["isic_id"]) for r in table)
        assert {(r["copyright_license"], r["attribution"]) for r in table} == {
            (ISIC2017_LICENSE, ISIC2017_ATTRIBUTION)
        }
    for r in (
        ds["synthetic"]
        .select_columns(["content_isic_id", "style_isic_id", "copyright_license", "attribution"])
        .to_list()
    ):
        assert r["copyright_license"] == ISIC2017_LICENSE  # CC-0 content x CC-0 style
        assert r["content_isic_id"] in r["attribution"] and r["style_isic_id"] in r["attribution"]
        assert ISIC2017_ATTRIBUTION in r["attribution"]


@pytest.mark.parametrize("engine", ENGINES)
def test_real_rows_carry_their_imported_mask_and_only_those(flow, loaded, engine):
    with_mask = set()
    for split in ("train", "validation", "test"):
        for example in loaded[engine][split]:
            if example["mask"] is not None:
                assert example["mask"].size == example["image"].size, example["isic_id"]
                assert set(np.unique(np.asarray(example["mask"]))) == {0, 255}
                with_mask.add(example["isic_id"])
    assert with_mask == {i for i, want in flow.truth.items() if want["mask"]}


@pytest.mark.parametrize("engine", ENGINES)
def test_packaged_synthetic_images_are_the_generated_size(flow, loaded, engine):
    size = ENGINES[engine][0]
    assert {im.size for im in loaded[engine]["synthetic"]["image"]} == {(size, size)}


@pytest.mark.parametrize("engine", ENGINES)
def test_dataset_card_states_the_gates_verdicts(flow, engine):
    card = (flow.hub(engine) / "README.md").read_text(encoding="utf-8")
    summary = json.loads((flow.synthetic(engine) / "generate_summary.json").read_text(encoding="utf-8"))
    failed = {v: n for v, n in summary["verdicts"].items() if v != "ok"}
    for verdict, n in failed.items():
        assert f"{n} `{verdict}`" in card
    assert f"{summary['verdicts']['ok']} `ok`" in card
