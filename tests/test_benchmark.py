"""The ST-DA benchmark: folds x seeds x arms bookkeeping, no leakage per fold, statistics, resume, report."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stda_hf.benchmark import BenchmarkConfig, run_benchmark, stages
from stda_hf.benchmark.config import (
    RELIANCE_METRICS,
    SPLIT_ORDER,
    RunKey,
    dataset_key,
    fold_dir,
    plan_runs,
    recipe_settings,
    synthetic_recipe,
    train_settings,
)
from stda_hf.benchmark.data import check_fold_synthetic, prepare_sources, write_fold_view
from stda_hf.benchmark.plots import plot_boxplots
from stda_hf.benchmark.report import render_report
from stda_hf.benchmark.runner import (
    check_stage_settings,
    check_thresholds,
    report_explanations,
    report_references,
    report_stats,
)
from stda_hf.benchmark.runs import device_slots
from stda_hf.benchmark.stages import (
    label_by_style_source,
    prepare_fold,
    reliance_runs,
    shortcut_labels,
    without_artifact,
)
from stda_hf.benchmark.stats import (
    compute_stats,
    detectable_difference,
    equal_spread_band,
    fold_differences,
    holm,
    seed_spread,
    values_by_pair,
)
from stda_hf.benchmark.table import RunTable
from stda_hf.core.errors import StdaError
from stda_hf.data.real import ARTIFACTS, read_real_folder
from stda_hf.data.split import make_folds
from stda_hf.models.vgg import VGG8, Preprocessing, save_model

# ----------------------------------------------------------------------------------------------------------------
# Folds


def test_every_image_is_tested_exactly_once_across_folds(phantom_real_session):
    folds = make_folds(phantom_real_session, k=3, seed=0)
    tested = Counter(i for a in folds.assignments for i, s in a.items() if s == "test")
    assert set(tested) == {im.isic_id for im in folds.images}
    assert set(tested.values()) == {1}


def test_no_group_lesion_or_patient_spans_two_splits_of_a_fold(phantom_real_session):
    folds = make_folds(phantom_real_session, k=3, seed=0)
    by_id = {im.isic_id: im for im in folds.images}
    for assignment in folds.assignments:
        for attr in ("lesion_id", "patient_id"):
            sides: dict[str, set] = {}
            for i, split in assignment.items():
                sides.setdefault(getattr(by_id[i], attr), set()).add(split)
            assert all(len(s) == 1 for s in sides.values()), attr
        group_sides: dict[str, set] = {}
        for i, split in assignment.items():
            group_sides.setdefault(folds.groups[i], set()).add(split)
        assert all(len(s) == 1 for s in group_sides.values())


def test_each_fold_has_both_classes_in_every_split(phantom_real_session):
    folds = make_folds(phantom_real_session, k=3, seed=0)
    for fold in range(3):
        summary = folds.summary(fold)
        assert all(summary[s]["benign"] > 0 and summary[s]["malignant"] > 0 for s in SPLIT_ORDER)


def test_same_fold_seed_same_folds_other_seed_other_folds(phantom_real_session):
    a = make_folds(phantom_real_session, k=3, seed=0)
    b = make_folds(phantom_real_session, k=3, seed=0)
    c = make_folds(phantom_real_session, k=3, seed=1)
    assert a.assignments == b.assignments
    assert a.assignments != c.assignments


@pytest.mark.parametrize(("k", "val", "match"), [(1, 0.15, "at least 2"), (2, 0.6, "no training images")])
def test_bad_fold_settings_are_refused(phantom_real_session, k, val, match):
    with pytest.raises(StdaError, match=match):
        make_folds(phantom_real_session, k=k, val=val)


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping


def test_plan_covers_every_arm_fold_and_seed_once_pairs_first():
    cfg = BenchmarkConfig(folds=3, seeds=(0, 1), arms={"baseline": {}, "mix": {"synthetic": "mix"}})
    keys = plan_runs(cfg)
    assert len(keys) == len(set(keys)) == 3 * 2 * 2
    assert keys[:2] == [RunKey(0, 0, "baseline"), RunKey(0, 0, "mix")]


def test_run_table_round_trips_through_csv(tmp_path):
    table = RunTable(tmp_path / "runs.csv")
    table.record(
        RunKey(0, 1, "mix"), "done", seconds=3.5, run_dir="runs/mix/fold0-seed1", roc_auc=0.75, error=""
    )
    table.record(RunKey(1, 0, "baseline"), "failed", seconds=1.0, error="exit status 1:\nboom")
    loaded = RunTable.load(tmp_path / "runs.csv")
    assert loaded.rows[RunKey(0, 1, "mix")]["roc_auc"] == 0.75
    assert loaded.status(RunKey(1, 0, "baseline")) == "failed"
    assert loaded.rows[RunKey(1, 0, "baseline")]["error"] == "exit status 1: boom"
    assert loaded.to_csv() == table.to_csv()


def test_todo_skips_done_resumes_running_and_retries_failed_only_when_asked(tmp_path):
    table = RunTable(tmp_path / "runs.csv")
    keys = [RunKey(0, s, "baseline") for s in range(4)]
    table.record(keys[0], "done", roc_auc=0.5)
    table.record(keys[1], "failed", error="x")
    table.record(keys[2], "running")
    assert table.todo(keys) == [keys[2], keys[3]]
    assert table.todo(keys, retry_failed=True) == keys[1:]


def test_a_table_row_with_an_unknown_status_is_a_clear_error(tmp_path):
    (tmp_path / "runs.csv").write_text("arm,fold,seed,status\nbaseline,0,0,finished\n")
    with pytest.raises(StdaError, match="line 2: unknown status 'finished'"):
        RunTable.load(tmp_path / "runs.csv")


def test_config_refuses_a_missing_baseline_arm_and_repeated_seeds():
    with pytest.raises(StdaError, match="baseline"):
        BenchmarkConfig(arms={"mix": {"synthetic": "mix"}})
    with pytest.raises(StdaError, match="repeats"):
        BenchmarkConfig(seeds=(0, 0))


def test_an_unknown_label_source_is_refused_before_any_work(tmp_path):
    cfg = BenchmarkConfig(
        name="x",
        real=str(tmp_path),
        arms={"baseline": {"synthetic": "none"}, "mix": {"synthetic": "mix", "label": {"source": "oracle"}}},
    )
    with pytest.raises(StdaError, match=r"arms.mix.label.source.*'oracle'.*\['teacher', 'style'\]"):
        check_stage_settings(cfg)


def test_shipped_configs_load():
    from stda_hf.core.config import load_config

    configs = sorted((Path(__file__).parent.parent / "benchmarks" / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"phantoms-small", "phantoms-shortcut-reliance", "isic"}
    for path in configs:
        cfg = load_config(BenchmarkConfig, path)
        assert cfg.baseline in cfg.arms, path
        check_stage_settings(cfg)  # every stage accepts its section


# ----------------------------------------------------------------------------------------------------------------
# No leakage per fold


def test_fold_view_lists_the_folds_splits_and_links_every_image(phantom_real_session, tmp_path):
    folds = make_folds(phantom_real_session, k=3, seed=0)
    view = write_fold_view(tmp_path / "view", folds, 1, dict.fromkeys(SPLIT_ORDER, phantom_real_session))
    folder = read_real_folder(view)
    assert folder.splits() == folds.assignments[1]
    assert all(im.path.is_symlink() and im.mask_path is not None for im in folder.images)
    assert (view / "ATTRIBUTION.md").is_file()


def _manifest(folder: Path, pairs: list[tuple[str, str]], verdicts: tuple[str, ...] = ()) -> list[dict]:
    """A synthetic folder's manifest of (content, style) pairs, with the quality gate's verdicts if given."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"id": f"syn_{i:016x}", "content_id": c, "style_id": s} for i, (c, s) in enumerate(pairs)]
    for record, verdict in zip(records, verdicts, strict=False):
        record["quality"] = {"verdict": verdict}
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _fold0_train(source: Path, tmp_path: Path):
    """Fold 0's view of ``source`` (3 folds), and its benign and malignant train images."""
    folds = make_folds(source, k=3, seed=0)
    view = write_fold_view(tmp_path / "view", folds, 0, dict.fromkeys(SPLIT_ORDER, source))
    folder = read_real_folder(view)
    return view, folder.subset("train", "benign"), folder.subset("train", "malignant")


def test_synthetic_images_from_the_folds_train_images_pass(phantom_real_session, tmp_path):
    view, benign, malignant = _fold0_train(phantom_real_session, tmp_path)
    _manifest(tmp_path / "syn", [(benign[0].isic_id, malignant[0].isic_id)])
    assert check_fold_synthetic(view, tmp_path / "syn") == 1


def test_style_source_labels_follow_the_style_image_and_the_shortcut_share_counts_carriers(
    phantom_real_session, tmp_path
):
    import numpy as np
    from PIL import Image

    view, benign, malignant = _fold0_train(phantom_real_session, tmp_path)
    pairs = [(benign[i].isic_id, malignant[i].isic_id) for i in range(3)] + [
        (malignant[3].isic_id, benign[3].isic_id)
    ]
    _manifest(tmp_path / "syn", pairs)
    summary = label_by_style_source(view, tmp_path / "syn")
    labels = [
        json.loads(line)["label"] for line in (tmp_path / "syn" / "labels.jsonl").read_text().splitlines()
    ]
    assert labels == ["malignant"] * 3 + ["benign"] and summary.labels == {"benign": 1, "malignant": 3}
    # plant a patch (code 2) on the first benign content image only: one carrier, labelled malignant
    carrier = (
        view / "artifacts" / f"{benign[0].isic_id}.png"
    )  # a link into the shared phantoms: replaced, not written through
    carrier.parent.mkdir(exist_ok=True)
    patch = np.zeros((32, 32), np.uint8)
    patch[:4, :4] = 2
    carrier.unlink(missing_ok=True)
    Image.fromarray(patch).save(carrier)
    shares = shortcut_labels(view, tmp_path / "syn", "patch", 0.0)
    assert shares["with_shortcut"] >= 1 and shares["with_shortcut_malignant_share"] == 1.0


def test_style_source_labels_leave_out_what_failed_the_quality_gate_as_teacher_labels_do(
    phantom_real_session, tmp_path
):
    view, benign, malignant = _fold0_train(phantom_real_session, tmp_path)
    pairs = [(benign[i].isic_id, malignant[i].isic_id) for i in range(3)]
    lines = _manifest(tmp_path / "syn", pairs, verdicts=("ok", "unchanged", "content_lost"))
    summary = label_by_style_source(view, tmp_path / "syn")
    labelled = [
        json.loads(line)["id"] for line in (tmp_path / "syn" / "labels.jsonl").read_text().splitlines()
    ]
    assert labelled == [lines[0]["id"]]
    assert (summary.kept, summary.left_out_failed) == (1, {"content_lost": 1, "unchanged": 1})


def test_a_synthetic_image_styled_from_another_folds_test_image_is_refused(phantom_real_session, tmp_path):
    folds = make_folds(phantom_real_session, k=3, seed=0)
    view = write_fold_view(tmp_path / "view", folds, 0, dict.fromkeys(SPLIT_ORDER, phantom_real_session))
    train_benign = read_real_folder(view).subset("train", "benign")[0].isic_id
    # an image that trains fold 1 but is tested in fold 0: fine for fold 1, leakage for fold 0
    leak = next(
        i for i, s in folds.assignments[0].items() if s == "test" and folds.assignments[1][i] == "train"
    )
    _manifest(tmp_path / "syn", [(train_benign, leak)])
    with pytest.raises(StdaError, match=f"outside the train split.*{leak}"):
        check_fold_synthetic(view, tmp_path / "syn")


def test_shortcut_is_planted_only_in_the_chosen_splits(tmp_path):
    phantoms = {"n": 40, "size": 32, "seed": 3, "artifacts": {"patch": [0.0, 0.0]}}
    cfg = BenchmarkConfig(
        name="s", out=str(tmp_path / "work"), phantoms=phantoms, folds=2, shortcut={"artifact": "patch"}
    )
    sources = prepare_sources(cfg)
    assert sources["train"] != sources["test"] == sources["validation"]
    folds = make_folds(sources["test"], k=2, seed=0)
    view = read_real_folder(write_fold_view(tmp_path / "view", folds, 0, sources))
    patched = {im.isic_id: "patch" in im.extra["artifacts"] for im in view.images}
    train = view.subset("train")
    assert all(patched[im.isic_id] for im in train if im.label == "benign")
    assert not any(patched[im.isic_id] for im in train if im.label == "malignant")
    assert not any(patched[im.isic_id] for im in view.subset("test"))
    assert all(im.path.resolve().parent.parent == sources["test"].resolve() for im in view.subset("test"))


def test_every_finished_run_of_a_shortcut_benchmark_gets_its_reliance_measured(tmp_path):
    phantoms = {"n": 40, "size": 32, "seed": 3, "artifacts": {"patch": [0.0, 0.0]}}
    cfg = BenchmarkConfig(
        name="s", out=str(tmp_path / "work"), phantoms=phantoms, folds=2, shortcut={"artifact": "patch"}
    )
    sources = prepare_sources(cfg)
    folds = make_folds(sources["test"], k=2, seed=0)
    write_fold_view(fold_dir(cfg, 0) / "real", folds, 0, sources)
    save_model(
        VGG8(widths=(4, 8, 8, 8, 8), hidden=(8, 8)), cfg.work_dir / "runs" / "r" / "model", Preprocessing(32)
    )
    table = RunTable(cfg.work_dir / "runs.csv")
    table.record(RunKey(0, 0, "baseline"), "done", run_dir="runs/r", roc_auc=0.5, error="")
    reliance_runs(cfg, table)
    row = table.rows[RunKey(0, 0, "baseline")]
    assert set(RELIANCE_METRICS) <= set(row) and row["error"] == ""
    assert math.isfinite(row["reliance"]) and 0.0 <= row["roc_auc_reversed"] <= 1.0
    assert "reliance" in report_explanations(cfg) and "relevance_on_patch" in report_explanations(cfg)
    assert "untrained_relevance_on_patch" in report_references(cfg)


def _shortcut_cfg(tmp_path, size=32, **arms):
    phantoms = {"n": 40, "size": size, "seed": 3, "artifacts": {"patch": [0.0, 0.0]}}
    return BenchmarkConfig(
        name="s",
        out=str(tmp_path / "work"),
        phantoms=phantoms,
        folds=2,
        shortcut={"artifact": "patch"},
        arms={"baseline": {"synthetic": "none"}, **arms},
    )


def test_the_no_shortcut_control_trains_on_clean_phantoms_of_the_same_folds(tmp_path):
    cfg = _shortcut_cfg(tmp_path, clean={"synthetic": "none", "data": "clean"})
    sources = prepare_sources(cfg)
    folds = make_folds(sources["test"], k=2, seed=0)
    datasets = prepare_fold(cfg, folds, 0, sources)
    assert set(datasets) == {"", "clean:"} and dataset_key(cfg, "clean") == "clean:"
    planted = read_real_folder(fold_dir(cfg, 0) / "real")
    clean = read_real_folder(fold_dir(cfg, 0) / "clean" / "real")
    assert [im.isic_id for im in clean.subset("train")] == [im.isic_id for im in planted.subset("train")]
    assert any("patch" in im.extra["artifacts"] for im in planted.subset("train"))
    assert not any("patch" in im.extra["artifacts"] for im in clean.images)
    assert train_settings(cfg.arms["clean"]) == {"synthetic": "none"}


def test_the_positive_control_takes_the_artifact_off_the_content_images_and_nothing_else(tmp_path):
    cfg = _shortcut_cfg(tmp_path, size=64)
    sources = prepare_sources(cfg)
    view = write_fold_view(tmp_path / "view", make_folds(sources["test"], k=2, seed=0), 0, sources)
    cleaned = read_real_folder(without_artifact(view, tmp_path / "content", "patch"))
    original = read_real_folder(view)
    assert [im.isic_id for im in cleaned.images] == [im.isic_id for im in original.images]
    assert (tmp_path / "content" / "splits.csv").read_bytes() == (view / "splits.csv").read_bytes()
    carriers = [im for im in original.images if "patch" in im.extra["artifacts"]]
    assert carriers
    for im in carriers:
        before = np.asarray(Image.open(im.path).convert("RGB"))
        after = np.asarray(Image.open(cleaned[im.isic_id].path).convert("RGB"))
        labels = np.asarray(Image.open(im.artifact_path))
        change = np.abs(before.astype(int) - after.astype(int)).max(axis=-1)
        on_patch = labels == ARTIFACTS.index("patch") + 1
        near = np.zeros_like(on_patch)  # JPEG codes 16-px blocks and its decoder smooths colour across them
        ys, xs = np.nonzero(on_patch)
        near[max(0, ys.min() - 20) : ys.max() + 20, max(0, xs.min() - 20) : xs.max() + 20] = True
        assert change[on_patch].mean() > 20 and change[~near].max() <= 2 and (~near).mean() > 0.4


@pytest.mark.parametrize(
    ("arms", "extra", "match"),
    [
        ({"c": {"synthetic": "none", "data": "clean"}}, {}, "no-shortcut control of a `shortcut` benchmark"),
        ({"c": {"synthetic": "none", "data": "dirty"}}, {}, r"arms.c.data: 'dirty'"),
        ({}, {"content": {"remove_artifact": True}}, "needs a planted `shortcut`"),
        (
            {"c": {"synthetic": "mix", "content": {"inpaint": True}}},
            {},
            r"unknown content setting\(s\) \['inpaint'\]",
        ),
    ],
)
def test_controls_are_refused_where_they_cannot_work(arms, extra, match):
    with pytest.raises(StdaError, match=match):
        BenchmarkConfig(name="x", arms={"baseline": {}, **arms}, **extra)


def test_a_reliance_endpoint_needs_a_shortcut():
    arms = {"baseline": {}, "mix": {"synthetic": "mix"}}
    with pytest.raises(StdaError, match="measures a planted shortcut: set `shortcut` too"):
        BenchmarkConfig(name="r", arms=arms, primary={"arm": "mix", "metric": "reliance"})


# ----------------------------------------------------------------------------------------------------------------
# Statistics on known inputs


def test_holm_adjusts_the_finite_p_values_as_a_family():
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])


def test_seed_spread_is_the_pooled_within_fold_sd():
    values = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 2.0, (1, 1): 2.0}
    assert seed_spread(values) == (pytest.approx(1.0), 2)
    sd, dof = seed_spread({(0, 0): 1.0, (1, 0): 2.0})
    assert math.isnan(sd) and dof == 0


def test_equal_spread_band_is_wide_with_few_repeats_and_narrows_with_more():
    lo, hi = equal_spread_band(3, 3)
    assert (lo, hi) == (pytest.approx(0.2546, abs=1e-3), pytest.approx(3.928, abs=1e-2))
    assert lo == pytest.approx(1 / hi)
    lo100, hi100 = equal_spread_band(100, 100)
    assert lo < lo100 < 1 < hi100 < hi


def _rows(effect: float, noise: dict[str, float]) -> list[dict]:
    rows = []
    for fold in range(3):
        for seed in range(2):
            for arm, shift in (("baseline", 0.0), ("mix", effect)):
                value = 0.6 + 0.05 * fold + shift + noise[arm] * (1 if seed else -1)
                rows.append({"arm": arm, "fold": fold, "seed": seed, "status": "done", "roc_auc": value})
    rows.append({"arm": "mix", "fold": 9, "seed": 0, "status": "failed", "roc_auc": None, "error": "x"})
    return rows


def test_compute_stats_on_known_runs():
    rows = _rows(0.1, {"baseline": 0.02, "mix": 0.01})
    stats = compute_stats(rows, ["baseline", "mix"], "baseline", primary=("mix", "roc_auc"), folds=3)
    base, mix = stats.summaries[("baseline", "roc_auc")], stats.summaries[("mix", "roc_auc")]
    assert (base.n, mix.n, stats.n_done, stats.n_failed) == (6, 6, 12, 1)
    assert mix.mean - base.mean == pytest.approx(0.1)
    assert base.seed_sd == pytest.approx(0.02 * math.sqrt(2))
    assert mix.seed_sd / base.seed_sd == pytest.approx(0.5)
    (test,) = stats.tests
    assert (test.arm, test.metric, test.units, test.runs) == ("mix", "roc_auc", 3, 6)
    assert test.primary and test.p_adjusted == test.p_value
    assert test.mean_diff == pytest.approx(0.1) and test.p_value == 0.0  # every fold +0.1 exactly
    assert test.sign_flip_p == pytest.approx(2 / 2**3)
    assert stats.metrics == ["roc_auc"]


def test_report_states_the_unit_the_primary_endpoint_the_power_and_the_caveats(tmp_path):
    rows = _rows(0.1, {"baseline": 0.02, "mix": 0.01})
    rows[1]["roc_auc"] += 0.03  # fold 0 seed 0: mix gains a little more, so the folds differ
    stats = compute_stats(rows, ["baseline", "mix"], "baseline", primary=("mix", "roc_auc"), folds=3)
    cfg = BenchmarkConfig(
        name="known",
        arms={"baseline": {}, "mix": {"synthetic": "mix"}},
        prior_fold_sd=0.02,
        prior_source="pilot",
    )
    declared = {"arm": "mix", "metric": "roc_auc", "declared_at": "2026-12-06T04:00:00+00:00", "runs_done": 0}
    text = render_report(
        cfg, stats, [], [rows[-1]], {"Box plots": "boxplots.png"}, "It shows X.", "c.yaml", declared
    )
    assert "# ST-DA benchmark: known" in text
    assert f"{stats.summaries[('mix', 'roc_auc')].mean:.3f} ± " in text
    assert "The unit of analysis is the fold" in text
    assert (
        "Primary endpoint, declared before the runs (2026-12-06T04:00:00+00:00): `mix` minus `baseline` on ROC AUC: "
        "Δ = +0.105" in text
    )
    detectable = detectable_difference(0.02, 3)
    assert f"SD of fold differences 0.02 (pilot), this design detects a true |Δ| of {detectable:.3f}" in text
    assert (
        "Validity at k = 3 (4,000 simulated benchmarks with no true effect): the fold t-test rejects" in text
    )
    assert "| cannot reject at k = 3 (0.250) | cannot reject at k = 3 (0.250) |" in text
    assert "| **mix** | **ROC AUC** (primary) | 3 (6) | +0.105 |" in text
    assert "smallest two-sided p the sign-flip test can give with 3 folds is 0.25" in text
    assert "mix fold 9 seed 0: x" in text
    assert "truly equal spread give SD ratios between 0.25 and 3.93" in text
    assert "![Box plots](boxplots.png)" in text and text.rstrip().endswith("It shows X.")


def test_untrained_references_are_shown_beside_the_shares_but_not_tested():
    """The untrained model of a fold is the same for every arm: testing its zero difference only pads Holm."""
    cfg = BenchmarkConfig(
        name="refs",
        arms={"baseline": {}, "mix": {"synthetic": "mix"}},
        phantoms={"n": 40},
        shortcut={"artifact": "patch", "benign": 1.0, "malignant": 0.0},
        primary={"arm": "mix", "metric": "reliance"},
        seeds=(0,),
    )
    rows = []
    for fold in range(4):
        for arm, shift in (("baseline", 0.0), ("mix", 0.1 + 0.01 * fold)):
            rows.append(
                {"arm": arm, "fold": fold, "seed": 0, "status": "done", "roc_auc": 0.7 + shift,
                 "relevance_in_mask": 0.3 + shift, "relevance_on_patch": 0.4 - shift, "reliance": -4 + 10 * shift,
                 "untrained_relevance_in_mask": 0.33, "untrained_relevance_on_patch": 0.1, "mask_area": 0.13}
            )  # fmt: skip
    stats = report_stats(cfg, rows)
    tested = {t.metric for t in stats.tests}
    assert {"roc_auc", "relevance_in_mask", "relevance_on_patch", "reliance"} <= tested
    assert not any(m.startswith("untrained_") or m.endswith("_area") for m in tested)
    assert {"untrained_relevance_in_mask", "untrained_relevance_on_patch", "mask_area"} <= set(
        stats.area_metrics
    )
    text = render_report(cfg, stats, [], [], {}, "", "c.yaml", {})
    assert "| untrained: relevance in lesion | untrained: relevance on patch |" in text
    assert "| untrained" not in text.split("## Explanations")[0]  # no test row for a reference
    assert (
        "(×n/a)" not in text and "No fold has two finished seeds, so there is no repeatability figure" in text
    )  # one seed: no empty table


def test_fold_table_names_the_arms_that_train_on_each_synthetic_set():
    cfg = BenchmarkConfig(
        name="sets",
        arms={
            "baseline": {"synthetic": "none"},
            "mix": {"synthetic": "mix"},
            "mix_gatys": {"synthetic": "mix", "generate": {"engine": "gatys"}},
        },
    )
    own = f"synthetic-{synthetic_recipe(cfg, 'mix_gatys')}"
    counts = {"images": 10, "kept": 8, "malignant": 3}
    info = [{"fold": 0, "repeat": 0, "counts": {}, "synthetic": counts, own: counts}]
    stats = compute_stats(
        _rows(0.1, {"baseline": 0.02, "mix": 0.01}), ["baseline", "mix"], "baseline", folds=3
    )
    text = render_report(cfg, stats, info, [], {}, "", "c.yaml", {})
    assert "| synthetic (mix) | 10 | 8 | 3 |" in text and f"| {own} (mix_gatys) | 10 | 8 | 3 |" in text


def test_secondary_comparisons_are_holm_adjusted_and_the_primary_is_not():
    rows = _rows(0.1, {"baseline": 0.02, "mix": 0.01})[:-1]
    for r in rows:
        r["f1"] = r["roc_auc"] + (0.01 * r["fold"] if r["arm"] == "mix" else 0.0)
        r["sensitivity"] = r["roc_auc"] * (1.02 if r["arm"] == "mix" and r["fold"] != 1 else 1.0)
    stats = compute_stats(rows, ["baseline", "mix"], "baseline", primary=("mix", "f1"), folds=3)
    by_metric = {t.metric: t for t in stats.tests}
    assert by_metric["f1"].primary and by_metric["f1"].p_adjusted == by_metric["f1"].p_value
    secondary = [by_metric["roc_auc"], by_metric["sensitivity"]]
    assert [t.p_adjusted for t in secondary] == pytest.approx(holm([t.p_value for t in secondary]))


def test_repeated_cross_validation_rows_use_the_corrected_test():
    rows = []
    rng = np.random.default_rng(0)
    for repeat, fold, seed in itertools.product(range(2), range(3), range(2)):
        for arm, shift in (("baseline", 0.0), ("mix", 0.05)):
            value = 0.7 + shift + rng.normal(0, 0.02)
            rows.append(
                {"arm": arm, "repeat": repeat, "fold": fold, "seed": seed, "status": "done", "roc_auc": value}
            )
    stats = compute_stats(rows, ["baseline", "mix"], "baseline", primary=("mix", "roc_auc"), folds=3)
    (test,) = stats.tests
    assert (test.repeats, test.units, test.dof) == (2, 6, 5)
    assert test.method.startswith("corrected repeated k-fold")
    d = np.asarray(
        list(fold_differences(*(values_by_pair(rows, a, "roc_auc") for a in ("mix", "baseline")))[0].values())
    )
    assert test.statistic == pytest.approx(d.mean() / math.sqrt((1 / 6 + 1 / 2) * d.var(ddof=1)))


def test_primary_endpoint_and_repeats_are_validated():
    arms = {"baseline": {}, "mix": {"synthetic": "mix"}}
    with pytest.raises(StdaError, match="primary arm 'baseline'"):
        BenchmarkConfig(arms=arms, primary={"arm": "baseline", "metric": "roc_auc"})
    with pytest.raises(StdaError, match="primary metric 'auc'"):
        BenchmarkConfig(arms=arms, primary={"arm": "mix", "metric": "auc"})
    with pytest.raises(StdaError, match="not both"):
        BenchmarkConfig(arms=arms, fold_seeds=(0, 1), repeats=2)
    assert BenchmarkConfig(arms=arms, fold_seed=3, repeats=3).cv_seeds == [3, 4, 5]
    assert BenchmarkConfig(arms=arms).primary_endpoint == ("mix", "roc_auc")


def test_plan_covers_every_repetition_with_its_own_folders():
    cfg = BenchmarkConfig(
        seeds=(0,), folds=2, fold_seeds=(0, 7), arms={"baseline": {}, "mix": {"synthetic": "mix"}}
    )
    keys = plan_runs(cfg)
    assert len(keys) == 2 * 2 * 2 and {k.repeat for k in keys} == {0, 1}
    assert (
        RunKey(1, 0, "mix", 1).name == "mix/rep1-fold1-seed0"
        and RunKey(1, 0, "mix").name == "mix/fold1-seed0"
    )


def test_a_label_threshold_other_than_the_training_threshold_is_refused():
    cfg = BenchmarkConfig(
        arms={"baseline": {}, "mix": {"synthetic": "mix", "min_confidence": 0.8}},
        label={"min_confidence": 0.5},
    )
    with pytest.raises(StdaError, match=r"arm 'mix' trains with min_confidence 0.8 .* thresholded at 0.5"):
        check_thresholds(cfg)
    check_thresholds(BenchmarkConfig(arms=cfg.arms, label={"min_confidence": 0.8}))


def test_arms_with_their_own_generate_settings_get_their_own_synthetic_set():
    arms = {
        "baseline": {},
        "mix": {"synthetic": "mix"},
        "mix_gatys": {"synthetic": "mix", "generate": {"iterations": 5}},
        "also_gatys": {"synthetic": "pretrain", "generate": {"iterations": 5}},
    }
    cfg = BenchmarkConfig(arms=arms, generate={"size": 32, "iterations": 25})
    assert synthetic_recipe(cfg, "mix") == "" and synthetic_recipe(cfg, "baseline") == ""
    own = synthetic_recipe(cfg, "mix_gatys")
    assert own.startswith("s-") and own == synthetic_recipe(cfg, "also_gatys")
    assert recipe_settings(cfg, own)["generate"] == {"size": 32, "iterations": 5}
    assert train_settings(arms["mix_gatys"]) == {"synthetic": "mix"}


def test_box_plot_is_a_png(tmp_path):
    rows = _rows(0.1, {"baseline": 0.02, "mix": 0.01})
    path = plot_boxplots(rows, ["baseline", "mix"], ["roc_auc"], tmp_path / "b.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------------
# Runs: failures, resume, more seeds, protocol changes (a fake trainer that writes what train.py writes)

FAKE_TRAINER = r"""
import json, os, sys, time
from pathlib import Path
import yaml
from PIL import Image

args = sys.argv[1:]
cfg = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
run = Path(cfg["output_dir"])
name = f"{run.parent.name}/{run.name}"
start = time.time()
with open(os.environ["FAKE_CALLS"], "a") as fh:
    fh.write(json.dumps({"run": name, "mode": args[-1], "pid": os.getpid()}) + "\n")
if os.environ.get("FAKE_SLEEP"):
    time.sleep(float(os.environ["FAKE_SLEEP"]))
    with open(os.environ["FAKE_CALLS"] + ".gpu", "a") as fh:
        fh.write(json.dumps({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}) + "\n")
if name in os.environ.get("FAKE_HANG", ""):
    time.sleep(60)
if name in os.environ.get("FAKE_FAIL", ""):
    sys.exit("RuntimeError: the loss became NaN at epoch 2")
fold = int(Path(cfg["dataset"]).parent.name.removeprefix("fold"))
auc = 0.6 + 0.05 * fold + cfg.get("effect", 0.0) + 0.01 * cfg["seed"]
(run / "metrics").mkdir(parents=True, exist_ok=True)
(run / "explain").mkdir(exist_ok=True)
metrics = {"roc_auc": auc, "balanced_accuracy": auc - 0.1, "sensitivity": 0.7, "specificity": 0.6,
           "f1": 0.65, "hook_relevance_in_mask": 2.0, "epoch": 2, "split": "test",
           "_timestamp": "x"}
(run / "metrics" / "test.json").write_text(json.dumps(metrics))
with open(run / "log.jsonl", "w") as fh:
    for epoch in (1, 2):
        fh.write(json.dumps({"epoch": epoch, "train/loss": 1.0 / epoch, "validation/roc_auc": auc - 0.1 / epoch}) + "\n")
Image.new("RGB", (64, 16), (40 * fold, 100, 200)).save(run / "explain" / "grid.png")
"""


def _fake_explain(cfg, key, run_dir):
    """What ``stda explain`` would report: the mix arm looks more at the lesion."""
    return {"relevance_in_mask": 0.55 if key.arm == "mix" else 0.5, "relevance_on_artifact": None}


def _fake_prepare(cfg, folds, fold, sources, repeat=0):
    view = write_fold_view(fold_dir(cfg, fold, repeat) / "real", folds, fold, sources)
    (fold_dir(cfg, fold, repeat) / "fold.json").write_text(
        json.dumps({"fold": fold, "repeat": repeat, "counts": folds.summary(fold)})
    )
    return {"": view}


@pytest.fixture
def fake(tmp_path, monkeypatch, phantom_real_session):
    """A benchmark config over the phantom folder whose runs are done by the fake trainer."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setattr(stages, "prepare_fold", _fake_prepare)  # where the runner looks them up
    monkeypatch.setattr(stages, "explain_run", _fake_explain)
    settings = {
        "name": "fake",
        "real": str(phantom_real_session),
        "out": str(tmp_path / "work"),
        "report": str(tmp_path / "report"),
        "folds": 2,
        "seeds": (0,),
        "arms": {"baseline": {"synthetic": "none"}, "mix": {"synthetic": "mix", "effect": 0.05}},
        "train": {"epochs": 2},
        "train_command": ("{python}", str(script)),
        "devices": "cpu",
    }
    return settings


def _calls(tmp_path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_failing_run_is_recorded_as_failed_and_the_others_finish(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "mix/fold1-seed0")
    report = run_benchmark(BenchmarkConfig(**fake))
    table = RunTable.load(tmp_path / "work" / "runs.csv")
    assert [table.status(k) for k in sorted(table.rows)] == ["done", "done", "done", "failed"]
    assert "the loss became NaN" in table.rows[RunKey(1, 0, "mix")]["error"]
    assert "mix fold 1 seed 0: exit status 1" in report.read_text()


def test_failed_runs_are_retried_only_when_asked(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "mix/fold1-seed0")
    run_benchmark(BenchmarkConfig(**fake))
    monkeypatch.delenv("FAKE_FAIL")
    run_benchmark(BenchmarkConfig(**fake))
    assert len(_calls(tmp_path)) == 4
    run_benchmark(BenchmarkConfig(**fake, retry_failed=True))
    assert _calls(tmp_path)[4:] == [
        {"run": "mix/fold1-seed0", "mode": "--overwrite", "pid": _calls(tmp_path)[4]["pid"]}
    ]
    assert RunTable.load(tmp_path / "work" / "runs.csv").status(RunKey(1, 0, "mix")) == "done"


def test_adding_seeds_later_runs_only_the_new_runs_and_pairs_them(fake, tmp_path):
    run_benchmark(BenchmarkConfig(**fake))
    assert len(_calls(tmp_path)) == 4
    report = run_benchmark(BenchmarkConfig(**{**fake, "seeds": (0, 1)}))
    new = [c["run"] for c in _calls(tmp_path)[4:]]
    assert sorted(new) == [
        "baseline/fold0-seed1",
        "baseline/fold1-seed1",
        "mix/fold0-seed1",
        "mix/fold1-seed1",
    ]
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    (test,) = [t for t in stats["tests"] if t["metric"] == "roc_auc"]
    assert (test["units"], test["runs"], test["mean_diff"], test["primary"]) == (
        2,
        4,
        pytest.approx(0.05),
        True,
    )
    text = report.read_text()
    assert "| **mix** | **ROC AUC** (primary) | 2 (4) | +0.050 |" in text
    assert "| mix | 4 | 0.550 ± 0.000 |" in text  # explanation numbers of the runs, not the trainer's hooks
    declared = json.loads((tmp_path / "work" / "declaration.json").read_text())
    assert (declared["arm"], declared["metric"], declared["runs_done"]) == ("mix", "roc_auc", 0)
    assert f"Primary endpoint, declared before the runs ({declared['declared_at']})" in text
    assert {p.name for p in (tmp_path / "report").glob("*.png")} == {
        "boxplots.png",
        "learning_curves.png",
        "heatmaps.png",
    }


def test_changed_training_settings_are_refused_but_new_arms_are_added(fake, tmp_path):
    run_benchmark(BenchmarkConfig(**fake))
    with pytest.raises(StdaError, match=r"other \['train'\] settings"):
        run_benchmark(BenchmarkConfig(**{**fake, "train": {"epochs": 3}}))
    with pytest.raises(StdaError, match=r"arm\(s\) \['mix'\] changed"):
        run_benchmark(BenchmarkConfig(**{**fake, "arms": {**fake["arms"], "mix": {"synthetic": "mix"}}}))
    arms = {**fake["arms"], "pretrain": {"synthetic": "pretrain", "effect": 0.02}}
    run_benchmark(BenchmarkConfig(**{**fake, "arms": arms}))
    assert sorted(c["run"] for c in _calls(tmp_path)[4:]) == ["pretrain/fold0-seed0", "pretrain/fold1-seed0"]


RUNNER = """
import runpy, sys
from stda_hf.benchmark import stages
sys.path.insert(0, {tests!r})
from test_benchmark import _fake_explain, _fake_prepare
stages.prepare_fold = _fake_prepare
stages.explain_run = _fake_explain
sys.argv = ["stda_benchmark.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_the_report_says_declared_before_the_runs_only_when_the_record_says_so():
    rows = _rows(0.1, {"baseline": 0.02, "mix": 0.01})
    stats = compute_stats(rows, ["baseline", "mix"], "baseline", primary=("mix", "roc_auc"), folds=3)
    cfg = BenchmarkConfig(name="known", arms={"baseline": {}, "mix": {"synthetic": "mix"}})
    late = {"arm": "mix", "metric": "roc_auc", "declared_at": "t1", "runs_done": 4}
    other = {"arm": "mix", "metric": "f1", "declared_at": "t0", "runs_done": 0}
    texts = [render_report(cfg, stats, [], [], {}, "", "c.yaml", d) for d in ({}, late, other)]
    assert "Primary endpoint, not recorded before the runs" in texts[0]
    assert "Primary endpoint, declared after 4 run(s) had finished (t1)" in texts[1]
    assert "Primary endpoint, changed after the declaration (declared: `mix` on F1, t0)" in texts[2]
    assert not any("declared before the runs" in text for text in texts)
    assert "no prior SD of fold differences was stated" in texts[0]


@pytest.mark.parametrize(("signum", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupted_benchmark_stops_its_run_and_resumes_it(fake, tmp_path, signum, status):
    """Ctrl-C, and SIGTERM (``kill``, a scheduler's time limit): the running training command stops with it."""
    import signal
    import subprocess
    import time

    import yaml

    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump({**fake, "seeds": [0], "train_command": list(fake["train_command"])}))
    runner = tmp_path / "runner.py"
    root = Path(__file__).resolve().parent.parent
    runner.write_text(
        RUNNER.format(tests=str(root / "tests"), script=str(root / "benchmarks" / "stda_benchmark.py"))
    )
    env = {**os.environ, "FAKE_HANG": "mix/fold0-seed0"}
    proc = subprocess.Popen([sys.executable, str(runner), "--config", str(config)], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not any(c["run"] == "mix/fold0-seed0" for c in _calls(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(getattr(signal, signum))
    assert proc.wait(timeout=30) == status
    hung = next(c for c in _calls(tmp_path) if c["run"] == "mix/fold0-seed0")
    with pytest.raises(ProcessLookupError):
        os.kill(hung["pid"], 0)  # the training command was stopped with the benchmark
    assert RunTable.load(tmp_path / "work" / "runs.csv").status(RunKey(0, 0, "mix")) == "running"
    subprocess.run([sys.executable, str(runner), "--config", str(config)], check=True, cwd=tmp_path)
    resumed = [c for c in _calls(tmp_path) if c["run"] == "mix/fold0-seed0"]
    assert [c["mode"] for c in resumed] == ["--overwrite", "--resume"]
    table = RunTable.load(tmp_path / "work" / "runs.csv")
    assert [table.status(k) for k in sorted(table.rows)] == ["done"] * 4
    assert len(_calls(tmp_path)) == 5


# ----------------------------------------------------------------------------------------------------------------
# End to end with the real stages at the smallest size


@pytest.mark.slow
def test_real_stages_end_to_end_at_minimal_size(phantom_real_session, tmp_path):
    """Teacher, style transfer, pseudo-labels, packaging, train.py runs, explanations and the report."""
    cfg = BenchmarkConfig(
        name="tiny",
        real=str(phantom_real_session),
        out=str(tmp_path / "work"),
        report=str(tmp_path / "report"),
        folds=2,
        seeds=(0,),
        arms={"baseline": {"synthetic": "none"}, "mix": {"synthetic": "mix", "synthetic_ratio": 0.5}},
        train={
            "image_size": 32,
            "vgg8_widths": [4, 8, 8, 8, 8],
            "vgg8_hidden": [8, 8],
            "epochs": 1,
            "batch_size": 32,
            "num_workers": 0,
            "check_images": False,
            "explain_images": 0,  # the benchmark explains each finished run itself
        },
        generate={  # the pretrained engine: images that pass the quality gate in one forward pass
            "engine": "arbitrary",
            "size": 32,
            "per_content": 1,
            "device": "cpu",
            "limit": 6,
            "regions": "none",  # whole frame: region-aware, this network leaves most lesions `unchanged`
        },
        label={"device": "cpu"},
        explain={"split": "test", "limit": 4, "grid": 4, "device": "cpu"},
        devices="cpu",
        cpu_threads=1,
    )
    report = run_benchmark(cfg)
    table = RunTable.load(tmp_path / "work" / "runs.csv")
    assert {r["status"] for r in table.rows.values()} == {"done"}, table.to_csv()
    assert all(0.0 <= r["roc_auc"] <= 1.0 and r["relevance_in_mask"] is not None for r in table.rows.values())
    for fold in range(2):
        d = fold_dir(cfg, fold)
        assert check_fold_synthetic(d / "real", d / "synthetic") == 6
        assert json.loads((d / "fold.json").read_text())["synthetic"]["images"] == 6
        teacher_ids = set((d / "teacher" / "train_ids.txt").read_text().split())
        assert teacher_ids <= {im.isic_id for im in read_real_folder(d / "real").subset("train")}
    text = report.read_text()
    assert "| **mix** | **ROC AUC** (primary) | 2 (" in text and "heatmaps.png" in text
    assert all(0.0 < r["mask_area"] < 1.0 for r in table.rows.values())  # region sizes beside the shares
    assert "lesion area" in text


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"generate": {"iteratons": 5}}, r"`generate`: unknown setting\(s\) \['iteratons'\]"),
        ({"arms": {"baseline": {"synthetic": "mixx"}}}, r"`arms.baseline`: --synthetic 'mixx' is not valid"),
        ({"explain": {"method": "nope"}}, "`explain`"),
    ],
)
def test_a_typo_in_stage_settings_fails_before_any_work(tmp_path, settings, match):
    cfg = BenchmarkConfig(name="typo", out=str(tmp_path / "work"), phantoms={"n": 20, "size": 32}, **settings)
    with pytest.raises(StdaError, match=match):
        run_benchmark(cfg)
    assert not (tmp_path / "work").exists()


def test_device_slots_split_the_gpus_into_runs():
    assert device_slots("cpu", 1) == [None]
    assert device_slots("cpu", 1, cpu_slots=2) == [None, None]
    assert device_slots("0,1,2,3", 1) == ["0", "1", "2", "3"]
    assert device_slots("0,1,2,3", 2) == ["0,1", "2,3"]
    assert device_slots("4,5,6", 2) == ["4,5"]
    with pytest.raises(StdaError, match="only 2 GPU"):
        device_slots("0,1", 3)
    with pytest.raises(StdaError, match="GPU ids"):
        device_slots("gpu0", 1)


def test_runs_spread_over_gpus_one_run_per_gpu_at_a_time(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.5")
    run_benchmark(BenchmarkConfig(**{**fake, "devices": "0,1"}))
    spans = [json.loads(line) for line in (tmp_path / "calls.jsonl.gpu").read_text().splitlines()]
    assert len(spans) == 4 and {s["gpu"] for s in spans} == {"0", "1"}
    on = {gpu: sorted((s["start"], s["end"]) for s in spans if s["gpu"] == gpu) for gpu in ("0", "1")}
    for mine in on.values():  # never two runs on one GPU at once
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(mine))
    assert any(a0 < b1 and b0 < a1 for a0, a1 in on["0"] for b0, b1 in on["1"])  # the GPUs worked in parallel


@pytest.mark.parametrize("cpu_slots", [1, 2])
def test_cpu_slots_run_that_many_cpu_runs_at_once(fake, tmp_path, monkeypatch, cpu_slots):
    monkeypatch.setenv("FAKE_SLEEP", "0.5")
    run_benchmark(BenchmarkConfig(**{**fake, "cpu_slots": cpu_slots, "cpu_threads": 1}))
    spans = [json.loads(line) for line in (tmp_path / "calls.jsonl.gpu").read_text().splitlines()]
    assert len(spans) == 4 and {s["gpu"] for s in spans} == {None}
    events = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    at_once = max(itertools.accumulate(step for _, step in events))
    assert at_once == cpu_slots
    assert all(row["status"] == "done" for row in RunTable.load(tmp_path / "work" / "runs.csv").rows.values())


def test_cpu_slots_below_one_are_refused(fake):
    with pytest.raises(StdaError, match="cpu_slots: 0"):
        BenchmarkConfig(**{**fake, "cpu_slots": 0})
