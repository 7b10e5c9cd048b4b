"""The artifact-copy measure on cases whose answer is known, and the benchmark script that reports it.

Phantoms at 64 px: a content image without artifacts and style images rendered with exactly the artifacts a test
needs (the same photograph otherwise), so every expected verdict is known by construction.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy.ndimage import binary_dilation

from stda_hf.core.errors import StdaError
from stda_hf.data.phantoms import PhantomConfig, plan_images, render_plan
from stda_hf.data.real import ARTIFACTS
from stda_hf.metrics.artifact_copy import (
    KindVerdict,
    any_copied,
    artifact_kinds,
    copy_evidence,
    copy_verdicts,
    srgb_to_lab,
    wilson_interval,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def views():
    """Render a content phantom (no artifact) and style phantoms: one per kind and one with every kind."""
    cfg = PhantomConfig(n=4, size=SIZE, seed=1)
    plans = plan_images(cfg)
    content = render_plan(cfg, plans[0], ())
    styles = {kind: render_plan(cfg, plans[1], (kind,)) for kind in ARTIFACTS}
    styles["all"] = render_plan(cfg, plans[1], ARTIFACTS)
    return content, styles


def arr(view) -> np.ndarray:
    return np.asarray(view.image)


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def paste(content: np.ndarray, style: np.ndarray, where: np.ndarray, shift=(0, 0)) -> np.ndarray:
    out = content.copy()
    moved = np.roll(where, shift, (0, 1))
    out[moved] = np.roll(style, shift, (0, 1))[moved]
    return out


def judge(content, style_view, synthetic, content_labels=None):
    return copy_verdicts(arr(content), arr(style_view), synthetic, style_view.labels, content_labels)


# ----------------------------------------------------------------------------------------------------------------
# Nothing of the style in the synthetic image: nothing copied.


@pytest.mark.parametrize("kind", ARTIFACTS)
def test_content_itself_copies_nothing(views, kind):
    content, styles = views
    verdicts = judge(content, styles[kind], arr(content))
    assert verdicts[kind].measurable and not verdicts[kind].copied


def test_blurred_content_copies_nothing(views):
    content, styles = views
    blurred = np.asarray(content.image.filter(ImageFilter.GaussianBlur(1.0)))
    verdicts = judge(content, styles["all"], blurred)
    assert not any_copied(verdicts), verdicts


def test_jpeg_compressed_content_copies_nothing(views):
    content, styles = views
    verdicts = judge(content, styles["all"], jpeg(arr(content), 30))
    assert not any_copied(verdicts), verdicts


def test_colour_jittered_content_copies_nothing(views):
    content, styles = views
    jittered = np.clip(arr(content) * np.array([1.06, 0.95, 1.03]) + 6, 0, 255).astype(np.uint8)
    verdicts = judge(content, styles["all"], jittered)
    assert not any_copied(verdicts), verdicts


# ----------------------------------------------------------------------------------------------------------------
# The style's artifact in the synthetic image, wherever it is: copied.


@pytest.mark.parametrize("kind", ARTIFACTS)
def test_artifact_pasted_at_its_place_is_copied(views, kind):
    content, styles = views
    style = styles[kind]
    verdicts = judge(content, style, paste(arr(content), arr(style), style.labels > 0))
    assert verdicts[kind].copied, verdicts[kind]


@pytest.mark.parametrize("kind", ARTIFACTS)
def test_artifact_pasted_elsewhere_is_copied(views, kind):
    content, styles = views
    style = styles[kind]
    verdicts = judge(content, style, paste(arr(content), arr(style), style.labels > 0, shift=(21, 17)))
    assert verdicts[kind].copied, verdicts[kind]


def test_style_itself_copies_every_kind_it_shows(views):
    content, styles = views
    style = styles["all"]
    verdicts = judge(content, style, arr(style))
    assert sorted(k for k, v in verdicts.items() if v.copied) == sorted(artifact_kinds(style.labels))


def test_one_pasted_kind_is_the_only_kind_copied(views):
    content, styles = views
    style = styles["all"]
    ink = style.labels == ARTIFACTS.index("ink") + 1
    verdicts = judge(content, style, paste(arr(content), arr(style), ink))
    assert [k for k, v in verdicts.items() if v.copied] == ["ink"]


def test_evidence_lies_on_the_pasted_pixels(views):
    content, styles = views
    style = styles["patch"]
    where = style.labels > 0
    _, evidence = copy_evidence(
        arr(content), arr(style), paste(arr(content), arr(style), where), style.labels
    )
    assert evidence["patch"].sum() > 0 and not (evidence["patch"] & ~where).any()


# ----------------------------------------------------------------------------------------------------------------
# What is not a copy, and what cannot be measured.


def test_kind_the_content_shows_itself_is_not_judged(views):
    _, styles = views
    style = styles["all"]
    cfg = PhantomConfig(n=4, size=SIZE, seed=1)
    own = render_plan(cfg, plan_images(cfg)[0], ("ruler", "ink"))  # the content photograph, with two kinds
    verdicts = copy_verdicts(arr(own), arr(style), arr(style), style.labels, own.labels)
    assert sorted(verdicts) == ["dark_corners", "patch"]


def test_evidence_on_the_contents_own_artifact_is_ignored(views):
    content, styles = views
    style = styles["patch"]
    where = style.labels > 0
    own = np.zeros_like(style.labels)
    own[binary_dilation(where, iterations=2)] = (
        ARTIFACTS.index("ink") + 1
    )  # the content's "ink" covers the paste
    synthetic = paste(arr(content), arr(style), where)
    verdict = copy_verdicts(arr(content), arr(style), synthetic, style.labels, own)["patch"]
    assert verdict.pixels == 0 and not verdict.copied


def test_artifact_that_looks_like_the_rest_of_the_style_is_not_measurable(views):
    content, styles = views
    style = styles["ruler"]
    fake = np.zeros_like(style.labels)
    fake[20:28, 40:48] = ARTIFACTS.index("ruler") + 1  # a patch of plain skin labelled "ruler"
    skin_only = style.labels == 0
    fake[~skin_only] = 0
    verdict = copy_verdicts(arr(content), arr(style), arr(style), fake)["ruler"]
    assert not verdict.measurable and not verdict.copied


def test_style_without_artifacts_gives_no_verdict(views):
    content, _ = views
    assert copy_verdicts(arr(content), arr(content), arr(content), np.zeros((SIZE, SIZE), np.uint8)) == {}


def test_label_map_of_another_size_is_refused(views):
    content, styles = views
    with pytest.raises(StdaError, match=r"label map is \(32, 32\)"):
        copy_verdicts(arr(content), arr(styles["ink"]), arr(content), np.zeros((32, 32), np.uint8))


def test_unknown_artifact_code_is_refused(views):
    content, styles = views
    labels = styles["ink"].labels.copy()
    labels[0, 0] = 9
    with pytest.raises(StdaError, match="code 9"):
        copy_verdicts(arr(content), arr(styles["ink"]), arr(content), labels)


def test_grey_image_is_refused(views):
    content, styles = views
    with pytest.raises(StdaError, match="synthetic image: expected an 8-bit RGB image"):
        copy_verdicts(arr(content), arr(styles["ink"]), arr(content)[..., 0], styles["ink"].labels)


# ----------------------------------------------------------------------------------------------------------------
# The small pure pieces.


def test_lab_of_white_and_red_match_the_cie_values():
    lab = srgb_to_lab(np.array([[255, 255, 255], [255, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab, [[100.0, 0.0, 0.0], [53.24, 80.09, 67.20]], atol=0.05)


def test_wilson_interval_matches_the_textbook_values():
    np.testing.assert_allclose(wilson_interval(0, 10), (0.0, 0.2775), atol=5e-4)
    np.testing.assert_allclose(wilson_interval(5, 10), (0.2366, 0.7634), atol=5e-4)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark script, end to end on a tiny setting.

ROW = re.compile(
    r"^(?P<engine>\w+)\s+(?P<regions>[\w-]+)\s+(?P<arm>artifacts|placebo)\s+(?P<images>\d+)\s+(?P<gate_ok>\d+)\s+(?P<n>\d+)\s+"
    r"(?P<rate>[01]\.\d\d)\[(?P<lo>[01]\.\d\d),(?P<hi>[01]\.\d\d)\]"
    r"(?P<kinds>(\s+\d+/\d+\[[01]\.\d\d,[01]\.\d\d\]){4})\s+(?P<caused>-|\d+/\d+\[[01]\.\d\d,[01]\.\d\d\])\s*$"
)


def test_benchmark_script_prints_a_table_that_parses(tmp_path):
    figure = tmp_path / "grid.png"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "artifact_copy.py"),
        "--engines",
        "arbitrary",
        "--regions",
        "none",
        "--n",
        "16",
    ]
    cmd += ["--no-placebo", "--work", str(tmp_path / "work"), "--figure", str(figure)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [m.groupdict() for line in done.stdout.splitlines() if (m := ROW.match(line))]
    assert [(r["engine"], r["regions"], r["arm"]) for r in rows] == [("arbitrary", "none", "artifacts")]
    for r in rows:
        assert float(r["lo"]) <= float(r["rate"]) <= float(r["hi"])
        assert int(r["n"]) <= int(r["images"]) and int(r["gate_ok"]) <= int(r["images"])
    assert "figure: 16 phantoms at 64 px" in done.stdout
    assert Image.open(figure).size[0] > 3 * SIZE


def load_script():
    spec = importlib.util.spec_from_file_location(
        "artifact_copy_script", ROOT / "benchmarks" / "artifact_copy.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_passes_each_region_setting_to_stda_generate(tmp_path, monkeypatch):
    script = load_script()
    calls = []
    monkeypatch.setattr(script, "run_stda", calls.append)
    args = script.get_args_parser().parse_args(["--engines", "arbitrary"])
    script.generate(tmp_path / "real", tmp_path / "out", "arbitrary", "lesion-skin", args, regions_flag=True)
    assert calls[0][calls[0].index("--regions") + 1] == "lesion-skin"


def test_benchmark_refuses_a_region_setting_that_stda_generate_lacks(tmp_path):
    script = load_script()
    args = script.get_args_parser().parse_args(["--engines", "arbitrary"])
    with pytest.raises(SystemExit, match="no --regions flag yet"):
        script.generate(
            tmp_path / "real", tmp_path / "out", "arbitrary", "lesion-skin", args, regions_flag=False
        )


def test_caused_counts_pairs_copied_only_with_the_artifacts():
    script = load_script()
    copied = {"ink": KindVerdict("ink", True, True, 20, 20 / 4096, 30)}
    clean = {"ink": KindVerdict("ink", True, False, 0, 0.0, 30)}

    def judged(pair, verdicts):
        return script.Judged(pair, Path("c"), Path("s"), Path("x"), "ok", verdicts, {})

    with_artifacts = [judged(("a", "s1"), copied), judged(("b", "s2"), copied), judged(("c", "s3"), clean)]
    placebo = [judged(("a", "s1"), clean), judged(("b", "s2"), copied), judged(("c", "s3"), clean)]
    assert script.caused(with_artifacts, placebo).startswith("1/3[")


def test_benchmark_refuses_a_bad_threshold_with_one_line():
    script = load_script()
    with pytest.raises(SystemExit, match=r"^error: distinct -1.0: must be a positive Delta E$"):
        script.main(["--validate", "--distinct", "-1"])
