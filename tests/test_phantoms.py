"""Phantom lesions: deterministic, in the real-image layout, ABCD cues that separate the classes, planted artifacts."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from stda_hf.core.errors import StdaError
from stda_hf.data.phantoms import PhantomConfig, make_phantoms, parse_artifact_rates, plan_images, rerender
from stda_hf.data.real import ARTIFACTS, read_real_folder


def _rows(root):
    with open(root / "metadata.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_same_seed_gives_identical_files(tmp_path):
    cfg = PhantomConfig(n=12, size=32, seed=3)
    make_phantoms(tmp_path / "a", cfg)
    make_phantoms(tmp_path / "b", cfg)
    for sub in ("metadata.csv", "images/PHANTOM_0000007.jpg", "masks/PHANTOM_0000012.png"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes()


def test_other_seed_gives_other_images(tmp_path):
    make_phantoms(tmp_path / "a", PhantomConfig(n=4, size=32, seed=0))
    make_phantoms(tmp_path / "b", PhantomConfig(n=4, size=32, seed=1))
    a = np.asarray(Image.open(tmp_path / "a/images/PHANTOM_0000001.jpg"), float)
    b = np.asarray(Image.open(tmp_path / "b/images/PHANTOM_0000001.jpg"), float)
    assert np.abs(a - b).mean() > 5


def test_writes_the_real_image_layout(phantom_real_session):
    folder = read_real_folder(phantom_real_session)
    assert len(folder) == 60
    assert (phantom_real_session / "ATTRIBUTION.md").read_text().count("PHANTOM_") == 60
    assert (phantom_real_session / "LICENSES" / "cc0-1.0.txt").is_file()
    mask = np.asarray(Image.open(folder.images[0].mask_path))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255


def test_several_images_per_lesion_and_lesions_per_patient():
    plans = plan_images(PhantomConfig(n=200))
    per_lesion = np.bincount(np.unique([p.lesion_id for p in plans], return_inverse=True)[1])
    lesions_per_patient = {p.patient_id: set() for p in plans}
    for p in plans:
        lesions_per_patient[p.patient_id].add(p.lesion_id)
    assert per_lesion.max() > 1 and per_lesion.min() == 1
    assert max(len(s) for s in lesions_per_patient.values()) > 1


def test_plan_of_fewer_images_is_a_prefix():
    assert plan_images(PhantomConfig(n=30)) == plan_images(PhantomConfig(n=90))[:30]


def test_abcd_cues_differ_by_class_but_overlap(tmp_path):
    make_phantoms(tmp_path, PhantomConfig(n=150, size=48, seed=0, hair=0.0))
    rows = _rows(tmp_path)
    for cue in ("asymmetry", "border", "colour_variegation", "diameter_fraction"):
        benign = [float(r[cue]) for r in rows if r["diagnosis_1"] == "Benign"]
        malignant = [float(r[cue]) for r in rows if r["diagnosis_1"] == "Malignant"]
        assert np.mean(malignant) > np.mean(benign) + 0.05, cue
        assert max(benign) > min(malignant), f"{cue}: classes should overlap"
    area = {
        d: [
            np.asarray(Image.open(tmp_path / "masks" / f"{r['isic_id']}.png")).mean()
            for r in rows
            if r["diagnosis_1"] == d
        ]
        for d in ("Benign", "Malignant")
    }
    assert np.mean(area["Malignant"]) > np.mean(area["Benign"])


def test_planted_artifact_follows_per_class_rates(tmp_path):
    rates = {"patch": (1.0, 0.0), "ruler": (0.0, 0.0), "ink": (0.0, 0.0), "dark_corners": (0.0, 0.0)}
    make_phantoms(tmp_path, PhantomConfig(n=30, size=48, seed=1, artifacts=rates))
    for r in _rows(tmp_path):
        artifact_map = tmp_path / "artifacts" / f"{r['isic_id']}.png"
        if r["diagnosis_1"] == "Benign":
            assert r["artifacts"] == "patch"
            assert 2 in np.unique(np.asarray(Image.open(artifact_map)))
        else:
            assert r["artifacts"] == "" and not artifact_map.exists()


def test_refuses_folder_made_with_other_settings(tmp_path):
    make_phantoms(tmp_path, PhantomConfig(n=3, size=32))
    make_phantoms(tmp_path, PhantomConfig(n=3, size=32))  # same settings: fine
    with pytest.raises(StdaError, match="other settings"):
        make_phantoms(tmp_path, PhantomConfig(n=4, size=32))
    make_phantoms(tmp_path, PhantomConfig(n=4, size=32), overwrite=True)
    assert len(_rows(tmp_path)) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "at least one"),
        ({"size": 8}, "16 to 4096 pixels"),
        ({"size": 100_000}, r"16 to 4096 pixels a side .* about 149.0 GiB"),
        ({"malignant_fraction": 2}, "between 0 and 1"),
        ({"artifacts": {"glitter": (0.1, 0.1)}}, "unknown artifact"),
        ({"artifacts": {"ink": (2, 0)}}, "two rates"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(StdaError, match=match):
        PhantomConfig(**kwargs)


def test_artifact_rate_parsing():
    assert parse_artifact_rates(["patch=0.5,0", "ink=0.2"]) == {"patch": (0.5, 0.0), "ink": (0.2, 0.2)}
    with pytest.raises(StdaError, match="NAME=RATE"):
        parse_artifact_rates(["patch"])


# --- Interventions: the same photograph with an artifact removed or pasted ---


@pytest.fixture(scope="module")
def artifact_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("interventions")
    make_phantoms(
        out,
        PhantomConfig(
            n=24, size=48, image_format="png", artifacts={"patch": (1.0, 0.0), "ruler": (1.0, 1.0)}
        ),
    )
    return out


def _rows(folder):
    with open(folder / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_rerender_with_the_drawn_artifacts_is_the_written_image(artifact_folder):
    row = _rows(artifact_folder)[0]
    view = rerender(artifact_folder, row["isic_id"], tuple(row["artifacts"].split(";")))
    with Image.open(artifact_folder / "images" / f"{row['isic_id']}.png") as written:
        assert np.array_equal(np.asarray(view.image), np.asarray(written.convert("RGB")))


def test_removing_an_artifact_changes_only_its_own_pixels(artifact_folder):
    row = next(r for r in _rows(artifact_folder) if r["diagnosis_1"] == "Benign")  # patch and ruler
    both = rerender(artifact_folder, row["isic_id"], ("patch", "ruler"))
    ruler_only = rerender(artifact_folder, row["isic_id"], ("ruler",))
    changed = np.any(np.asarray(both.image) != np.asarray(ruler_only.image), axis=-1)
    patch_code = ARTIFACTS.index("patch") + 1
    assert changed.any() and not changed[both.labels == 0].any()  # only where an artifact was
    assert np.all(both.labels[changed] == patch_code)
    assert patch_code not in ruler_only.labels and ruler_only.artifacts == ("ruler",)
    assert np.array_equal(both.mask, ruler_only.mask)  # the same lesion


def test_pasting_an_artifact_adds_it_and_keeps_the_others(artifact_folder):
    row = next(r for r in _rows(artifact_folder) if r["diagnosis_1"] == "Malignant")  # ruler only
    plain = rerender(artifact_folder, row["isic_id"], ("ruler",))
    pasted = rerender(artifact_folder, row["isic_id"], ("ruler", "patch"))
    patch_code = ARTIFACTS.index("patch") + 1
    changed = np.any(np.asarray(plain.image) != np.asarray(pasted.image), axis=-1)
    assert (pasted.labels == patch_code).sum() > 0 and changed.any()
    assert np.all(pasted.labels[changed] == patch_code)  # the ruler and the rest are untouched


def test_rerender_refuses_a_folder_without_phantom_settings_and_an_unknown_id(artifact_folder, tmp_path):
    with pytest.raises(StdaError, match=r"no phantoms\.yaml"):
        rerender(tmp_path, "PHANTOM_0000001", ())
    with pytest.raises(StdaError, match="no phantom 'PHANTOM_9999999'"):
        rerender(artifact_folder, "PHANTOM_9999999", ())
    with pytest.raises(StdaError, match="unknown artifact"):
        rerender(artifact_folder, "PHANTOM_0000001", ("sticker",))
