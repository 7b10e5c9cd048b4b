"""Phantom lesions: deterministic, in the real-image layout, ABCD cues that separate the classes, planted artifacts."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from stda_hf.cli import main
from stda_hf.core.errors import StdaError
from stda_hf.data.phantoms import (
    PhantomConfig,
    frame_size,
    make_phantoms,
    parse_artifact_rates,
    plan_images,
    render_plan,
    rerender,
    view_frame,
)
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


# --- Non-square phantoms: --aspect W:H, --size the longer side ---


def _render_digest(size: int) -> str:
    """SHA-256 of the raw pixels, masks and artifact maps of 16 views at ``size`` (every artifact drawn in half)."""
    digest = hashlib.sha256()
    every = {a: (1.0, 1.0) for a in ARTIFACTS}
    for artifacts in (every, None):
        cfg = PhantomConfig(
            n=8, size=size, seed=5, hair=0.7, **({"artifacts": artifacts} if artifacts else {})
        )
        for plan in plan_images(cfg):
            view = render_plan(cfg, plan)
            for array in (np.asarray(view.image), view.mask, view.labels):
                digest.update(array.tobytes())
    return digest.hexdigest()


# Digests of the square renderer as it was before --aspect existed (commit 2ff2fe0, numpy 2.4, Pillow 13): the
# default square output must stay bit-identical, so folders, benchmarks and figures made before do not move.
SQUARE_BEFORE_ASPECT = {
    32: "a49d7a52ea49f41f4830a8f52d9f8383fdaa9291e6c0018f97d75857230cfa4b",
    47: "9a5c49657e19e61d574f6f501eb911b05dbeb0107c2b06369790eb0dd794ce18",
}


@pytest.mark.parametrize("size", sorted(SQUARE_BEFORE_ASPECT))
def test_square_phantoms_are_bit_identical_to_the_renderer_before_aspect(size):
    assert _render_digest(size) == SQUARE_BEFORE_ASPECT[size]


def test_frame_size_keeps_size_as_the_longer_side():
    assert frame_size(96, "1:1") == (96, 96)
    assert frame_size(96, "4:3") == (96, 72)
    assert frame_size(96, "3:2") == (96, 64)
    assert frame_size(96, "3:4") == (72, 96)
    assert frame_size(1022, "1022:767") == (1022, 767)  # an ISIC 2017 image's own ratio


def test_one_aspect_given_as_text_is_one_aspect():
    assert PhantomConfig(size=48, aspect="4:3").aspect == ("4:3",)


def test_aspects_give_a_mix_of_sizes_with_masks_and_artifact_maps_of_the_same_size(tmp_path):
    every = {a: (0.5, 0.5) for a in ARTIFACTS}
    argv = ["phantoms", "--out", str(tmp_path), "--n", "16", "--size", "48", "--aspect", "4:3", "3:2"]
    assert main(argv) == 0
    cfg = PhantomConfig(n=16, size=48, aspect=("4:3", "3:2"), artifacts=every)
    make_phantoms(tmp_path / "arts", cfg)
    sizes = []
    for root in (tmp_path, tmp_path / "arts"):
        for r in _rows(root):
            with Image.open(root / "images" / f"{r['isic_id']}.jpg") as image:
                sizes.append(image.size)
            with Image.open(root / "masks" / f"{r['isic_id']}.png") as mask:
                assert mask.size == image.size
            if r["artifacts"]:
                with Image.open(root / "artifacts" / f"{r['isic_id']}.png") as artifact_map:
                    assert artifact_map.size == image.size
    assert set(sizes) == {(48, 36), (48, 32)}  # both aspects drawn, nothing else


def test_a_mixed_folders_square_images_are_the_square_folders_images():
    square = PhantomConfig(n=12, size=32, seed=4)
    mixed = PhantomConfig(n=12, size=32, seed=4, aspect=("1:1", "3:2"))
    drawn_square = 0
    for plan in plan_images(mixed):
        if view_frame(mixed, plan) == (32, 32):
            drawn_square += 1
            a, b = render_plan(mixed, plan), render_plan(square, plan)
            assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.mask, b.mask)
    assert 0 < drawn_square < 12


def test_lesion_is_centred_and_sized_to_the_shorter_side_of_a_wide_frame():
    wide = PhantomConfig(n=10, size=96, seed=2, hair=0.0, aspect=("4:3",))  # 96 x 72
    square = PhantomConfig(n=10, size=72, seed=2, hair=0.0)  # the same lesions and views at 72 x 72
    for plan in plan_images(wide):
        mask, same = render_plan(wide, plan).mask > 0, render_plan(square, plan).mask > 0
        assert mask.shape == (72, 96)
        assert abs(mask.sum() - same.sum()) <= 0.05 * same.sum() + 4  # the same lesion, not stretched
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() - 48) < 0.15 * 96 and abs(ys.mean() - 36) < 0.15 * 72


def test_artifacts_follow_the_edges_and_corners_of_a_wide_frame():
    only = {a: (0.0, 0.0) for a in ARTIFACTS}
    codes = {a: ARTIFACTS.index(a) + 1 for a in ARTIFACTS}
    ruler = PhantomConfig(n=8, size=90, seed=1, aspect=("3:2",), artifacts={**only, "ruler": (1.0, 1.0)})
    for plan in plan_images(ruler):
        band = render_plan(ruler, plan).labels == codes["ruler"]
        rows, cols = np.nonzero(band.any(axis=1))[0], np.nonzero(band.any(axis=0))[0]
        along_x = band[rows].all(axis=1).any()  # a full-width band at the top or bottom, else full height
        assert along_x or band[:, cols].all(axis=0).any()
        assert rows.min() == 0 or rows.max() == 59 or cols.min() == 0 or cols.max() == 89
    corners = PhantomConfig(
        n=4, size=90, seed=1, aspect=("3:2",), artifacts={**only, "dark_corners": (1.0, 1.0)}
    )
    for plan in plan_images(corners):
        labels = render_plan(corners, plan).labels
        assert all(labels[y, x] == codes["dark_corners"] for y in (0, 59) for x in (0, 89))
        assert not labels[20:40, 30:60].any()  # the middle of the frame stays open


def test_rerender_of_a_non_square_phantom_is_the_written_image(tmp_path):
    make_phantoms(tmp_path, PhantomConfig(n=6, size=48, image_format="png", aspect=("4:3", "3:2")))
    for row in _rows(tmp_path):
        view = rerender(tmp_path, row["isic_id"], tuple(filter(None, row["artifacts"].split(";"))))
        with Image.open(tmp_path / "images" / f"{row['isic_id']}.png") as written:
            assert np.array_equal(np.asarray(view.image), np.asarray(written.convert("RGB")))


def test_a_folder_made_before_aspect_existed_counts_as_square(tmp_path):
    cfg = PhantomConfig(n=3, size=32)
    make_phantoms(tmp_path, cfg)
    settings = tmp_path / "phantoms.yaml"
    settings.write_text(settings.read_text().replace("aspect:\n- '1:1'\n", ""))  # as written before --aspect
    make_phantoms(tmp_path, cfg)  # the same settings: fine
    with pytest.raises(StdaError, match="other settings"):
        make_phantoms(tmp_path, PhantomConfig(n=3, size=32, aspect=("4:3",)))


@pytest.mark.parametrize(
    ("aspect", "match"),
    [
        (("3x2",), r"give WIDTH:HEIGHT"),
        ((243,), r"quote it, '3:2'"),  # YAML 1.1 reads an unquoted 4:3 as the number 243
        (("0:1",), r"give WIDTH:HEIGHT in whole numbers, e.g. 1:1, 4:3 or 3:2$"),
        (("\u00b2:1",), r"give WIDTH:HEIGHT"),  # a superscript two is a digit to str.isdigit, not to int()
        (("9:1",), r"between 1:4 and 4:1"),
        (("4:1",), r"shorter side would be 8 px, fewer than 16"),
        ((), r"at least one"),
    ],
)
def test_bad_aspects_are_refused_naming_the_value(aspect, match):
    with pytest.raises(StdaError, match=match):
        PhantomConfig(size=32, aspect=aspect)
