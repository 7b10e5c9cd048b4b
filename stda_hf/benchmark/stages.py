"""The pipeline stages a benchmark runs per fold: teacher, style transfer, pseudo-labels, dataset; then explanations.

Each stage resumes on its own; this is the one module of the benchmark that calls other stages in-process."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stda_hf.benchmark.config import (
    AREA_METRICS,
    DEFAULT_EXPLAIN,
    EXPLAIN_DIR,
    SPLIT_ORDER,
    BenchmarkConfig,
    RunKey,
    arm_data,
    arm_uses_synthetic,
    fold_dir,
    recipe_settings,
    synthetic_recipe,
)
from stda_hf.benchmark.data import check_fold_synthetic, shortcut_phantom_settings, write_fold_view
from stda_hf.benchmark.runs import run_command, train_argv
from stda_hf.benchmark.table import RunTable
from stda_hf.core.errors import StdaError
from stda_hf.data.real import read_real_folder

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Fold preparation


def prepare_fold(
    cfg: BenchmarkConfig, folds, fold: int, sources: dict[str, Path], repeat: int = 0
) -> dict[str, Path]:
    """Build one fold's datasets and return ``{dataset key: dataset folder}``; records ``fold.json``.

    Real view -> (teacher trained on the view's real train images -> for each synthetic recipe of the arms,
    synthetic images from its train images -> pseudo-labels) -> packaged dataset with validation and test real
    only. Recipe ``""`` (the benchmark's own `generate`/`label` settings) is ``hub/``, which every arm without
    synthetic images trains on too; an arm with its own settings gets ``synthetic-<recipe>`` and ``hub-<recipe>``.
    Arms with ``data: clean`` (the no-shortcut control) get the same pipeline on clean phantoms in ``clean/``,
    keyed ``clean:<recipe>`` (:func:`~.config.dataset_key`).
    """
    from stda_hf.core.fileio import write_json

    d = fold_dir(cfg, fold, repeat)
    info: dict[str, Any] = {"fold": fold, "repeat": repeat, "counts": folds.summary(fold)}
    out: dict[str, Path] = {}
    variants = sorted({arm_data(cfg, a) for a in cfg.arms})
    for variant in variants:
        arms = [a for a in cfg.arms if arm_data(cfg, a) == variant]
        here = d if variant == "shortcut" else d / variant
        data = sources if variant == "shortcut" else dict.fromkeys(SPLIT_ORDER, cfg.work_dir / "phantoms")
        view = write_fold_view(here / "real", folds, fold, data)
        name = f"benchmark/{cfg.name}-{d.name}" + ("" if variant == "shortcut" else f"-{variant}")
        datasets, details = _prepare_variant(cfg, here, view, arms, name, repeat)
        prefix = "" if variant == "shortcut" else f"{variant}:"
        out.update({prefix + recipe: folder for recipe, folder in datasets.items()})
        info.update({(prefix + k if prefix else k): v for k, v in details.items()})
    write_json(d / "fold.json", info)
    return out


def _prepare_variant(
    cfg: BenchmarkConfig, d: Path, view: Path, arms: list[str], name: str, repeat: int
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Teacher, synthetic sets and packaged datasets of ``arms`` on one fold view; ``({recipe: hub}, details)``."""
    from stda_hf.dataset import PackageConfig, package

    recipes = sorted({synthetic_recipe(cfg, a) for a in arms if arm_uses_synthetic(cfg.arms[a])})
    teacher = None
    if recipes:
        package(view, d / "hub-real", cfg=PackageConfig(name=f"{name}-real"))
        teacher = train_teacher(cfg, d / "teacher", d / "hub-real", cfg.cv_seeds[repeat])
    out: dict[str, Path] = {}
    info: dict[str, Any] = {}
    for recipe in sorted({"", *recipes}):
        suffix = f"-{recipe}" if recipe else ""
        synthetic = d / f"synthetic{suffix}" if recipe in recipes else None
        if synthetic is not None:
            info[f"synthetic{suffix}"] = make_synthetic(cfg, view, synthetic, teacher, recipe)
        package(view, d / f"hub{suffix}", synthetic=synthetic, cfg=PackageConfig(name=name + suffix))
        out[recipe] = d / f"hub{suffix}"
    return out, info


def make_synthetic(
    cfg: BenchmarkConfig, view: Path, out: Path, teacher: Path, recipe: str = ""
) -> dict[str, Any]:
    """Style transfer from the fold's train images, the leakage check, and pseudo-labels; returns counts.

    ``recipe`` names the `generate`/`label` settings (:func:`~.config.recipe_settings`). Besides the label
    counts it reports the synthetic images that carry the planted shortcut artifact (they inherit it from their
    content image) and how many of those were labelled malignant.
    """
    from stda_hf.generate import GenerateConfig, generate
    from stda_hf.label import LabelConfig, label_synthetic

    settings = recipe_settings(cfg, recipe)
    content = view
    if settings["content"].get("remove_artifact"):
        content = without_artifact(view, out.with_name(out.name + "-content"), cfg.shortcut["artifact"])
    generate(content, out, GenerateConfig(**settings["generate"]))
    images = check_fold_synthetic(view, out)
    source = settings["label"].get("source", "teacher")
    label = {k: v for k, v in settings["label"].items() if k != "source"}
    if source == "style":
        summary = label_by_style_source(view, out, float(label.get("min_confidence", 0.0)))
    else:
        summary = label_synthetic(out, LabelConfig(**{**label, "teacher": str(teacher), "real": str(view)}))
    info = {
        "images": images,
        "kept": summary.kept,
        "malignant": summary.labels.get("malignant", 0),
        "kept_malignant": summary.kept_labels.get("malignant", 0),
        "teacher": summary.teacher,
        "label_source": source,
        "generate": settings["generate"],
        "content": settings["content"],
    }
    if cfg.shortcut:
        info.update(shortcut_labels(view, out, cfg.shortcut["artifact"], summary.min_confidence))
    return info


def without_artifact(view: Path, dest: Path, artifact: str) -> Path:
    """A copy of a fold view whose images carrying ``artifact`` are re-rendered without it (the positive control).

    Only phantoms can be re-rendered (:func:`~stda_hf.data.phantoms.rerender`: the same photograph, that one
    artifact left out); the other images are linked. Ids, metadata and ``splits.csv`` are the view's, so the
    synthetic images made from it derive from the same train images as any other arm's.
    """
    from stda_hf.data.images import save_image
    from stda_hf.data.phantoms import phantom_plan, rerender

    folder = read_real_folder(view)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(view, dest, symlinks=True)
    plans: dict[Path, tuple] = {}
    for im in folder.images:
        drawn = tuple(a for a in im.extra.get("artifacts", "").split(";") if a)
        if artifact not in drawn:
            continue
        root = Path(im.path).resolve().parent.parent
        plan = plans.setdefault(root, phantom_plan(root))
        clean = rerender(root, im.isic_id, tuple(a for a in drawn if a != artifact), plan)
        (dest / "images" / im.path.name).unlink()
        save_image(
            clean.image, dest / "images" / im.path.name
        )  # the same format and quality as the phantom's
        (dest / "artifacts" / f"{im.isic_id}.png").unlink(missing_ok=True)
        if clean.labels.any():
            save_image(Image.fromarray(clean.labels, "L"), dest / "artifacts" / f"{im.isic_id}.png")
    return dest


LABEL_SOURCES = ("teacher", "style")
"""Where an arm's pseudo-labels come from (``label: {source: ...}``): ``stda label``'s teacher, or the style image."""
STYLE_SOURCE_TEACHER = "style-source-class"
"""The ``teacher`` recorded in ``labels.jsonl`` when synthetic images are labelled by their style image's class."""


def label_by_style_source(view: Path, synthetic: Path, min_confidence: float = 0.0):
    """Label each synthetic image with its style image's class (``label: {source: style}`` of an arm).

    The arm that can weaken a shortcut the teacher learned: with benign content and malignant style every
    synthetic image is labelled malignant, so an artifact carried by the benign content images meets the
    malignant label in the synthetic set, where a teacher that learned "artifact = benign" would label it
    benign. Writes ``labels.jsonl`` and ``labels_summary.json`` in the ``stda label`` layout (probabilities
    one-hot, confidence 1) so packaging and training read them unchanged; returns the summary.

    Raises
    ------
    StdaError
        When a style image is not a labelled image of the fold view.
    """
    import torch

    from stda_hf import LABELS
    from stda_hf.core.fileio import read_jsonl, write_json, write_text
    from stda_hf.label import LABELS_FILE, SUMMARY_FILE, LabelSummary, label_record, passed_gate, summarize

    classes = {im.isic_id: im.label for im in read_real_folder(view).images}
    # the quality gate applies as it does to teacher labels: a failed image is not labelled, so it is neither
    # packaged nor counted as kept
    manifest, left_out = passed_gate(read_jsonl(synthetic / "manifest.jsonl"), keep_failed=False)
    records = []
    for image_id, record in sorted(manifest.items()):
        label = classes.get(record.get("style_id"))
        if label not in LABELS:
            raise StdaError(
                f"{synthetic}: style image {record.get('style_id')!r} of {image_id} has no class in {view}"
            )
        probs = torch.zeros(len(LABELS))
        probs[LABELS.index(label)] = 1.0
        records.append(label_record(image_id, probs, STYLE_SOURCE_TEACHER))
    write_text(synthetic / LABELS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    summary = LabelSummary(
        **summarize(records, manifest, min_confidence),
        teacher=STYLE_SOURCE_TEACHER,
        temperature=1.0,
        calibration=None,
        calibration_method="none",
        skipped={},
        settings={"source": "style", "min_confidence": min_confidence},
        left_out_failed=left_out,
    )
    write_json(synthetic / SUMMARY_FILE, summary.to_json())
    return summary


def shortcut_labels(view: Path, synthetic: Path, artifact: str, min_confidence: float) -> dict[str, Any]:
    """How the pseudo-labels treat the planted shortcut: synthetic images whose content image carries
    ``artifact`` (style transfer keeps the content's layout, so they carry it too), and the share of them
    labelled malignant, overall and at the training threshold.

    In the shortcut design the artifact marks benign images; a teacher that learned it labels these images
    benign, and training on them reinforces the shortcut. A share near 0 says the synthetic set teaches
    "artifact = benign"; a share well above 0 says it works against it.
    """
    from stda_hf.core.fileio import read_jsonl

    marked = {im.isic_id for im in read_real_folder(view).images if _carries(im.artifact_path, artifact)}
    manifest = {r["id"]: r for r in read_jsonl(synthetic / "manifest.jsonl")}
    labels = [r for r in read_jsonl(synthetic / "labels.jsonl") if r["id"] in manifest]
    carrying = [r for r in labels if manifest[r["id"]].get("content_id") in marked]
    kept = [r for r in carrying if r["confidence"] >= min_confidence]

    def share(rows: list[dict]) -> float | None:
        return round(sum(r["label"] == "malignant" for r in rows) / len(rows), 4) if rows else None

    return {
        "with_shortcut": len(carrying),
        "with_shortcut_malignant_share": share(carrying),
        "with_shortcut_kept": len(kept),
        "with_shortcut_kept_malignant_share": share(kept),
    }


def _carries(artifact_path: Path | None, artifact: str) -> bool:
    """Whether an image's artifact label map (``artifacts/<id>.png``) marks any pixel as ``artifact``."""
    from stda_hf.data.real import ARTIFACTS

    if artifact_path is None or not Path(artifact_path).is_file():
        return False
    with Image.open(artifact_path) as im:
        return bool((np.asarray(im) == ARTIFACTS.index(artifact) + 1).any())


def train_teacher(cfg: BenchmarkConfig, run_dir: Path, dataset: Path, seed: int | None = None) -> Path:
    """Train (or reuse) the fold's teacher on real images only, seeded with its repetition's fold seed (``seed``,
    default ``fold_seed``); return its run folder.

    Raises
    ------
    StdaError
        When the training command fails (the message carries the end of its log).
    """
    from stda_hf.models.vgg import MODEL_DIR

    if (run_dir / MODEL_DIR / "config.json").is_file():
        return run_dir
    settings = {
        **cfg.train,
        **cfg.teacher,
        "synthetic": "none",
        "seed": cfg.fold_seed if seed is None else seed,  # fixed with the folds: seeds never change a teacher
        "dataset": str(dataset),
    }
    argv = train_argv(cfg, settings, run_dir, "resume")
    ok, error, _ = run_command(argv, run_dir.with_suffix(".log"), None, cfg.run_timeout, cfg.cpu_threads)
    if not ok:
        raise StdaError(f"teacher training in {run_dir} failed: {error}")
    return run_dir


def prepare_folds(
    cfg: BenchmarkConfig, folds, sources: dict[str, Path], wanted: list[int], repeat: int = 0
) -> dict[tuple[int, int], Any]:
    """``{(repeat, fold): {recipe: dataset folder}}`` for each wanted fold of one CV repetition (``folds`` is
    its partition), or the error that stopped the fold's preparation."""
    out: dict[tuple[int, int], Any] = {}
    for fold in wanted:
        logger.info("preparing fold %d of %d (repetition %d)", fold + 1, cfg.folds, repeat)
        try:
            out[(repeat, fold)] = prepare_fold(cfg, folds, fold, sources, repeat)
        except Exception as err:  # one broken fold is recorded against its runs; the others go on
            logger.warning(
                "fold %d could not be prepared: %s", fold, err, exc_info=logger.isEnabledFor(logging.DEBUG)
            )
            out[(repeat, fold)] = f"fold {fold} preparation failed: {type(err).__name__}: {err}"
    return out


# ----------------------------------------------------------------------------------------------------------------
# Explaining finished runs


def explain_run(cfg: BenchmarkConfig, key: RunKey, run_dir: Path) -> dict[str, float | None]:
    """Explain one finished run on its fold's images (``stda explain``); return its ``relevance_*`` numbers.

    Every arm of a fold is explained on the same images (the fold view's ``explain.split``, first ``limit``),
    so the numbers and heatmap grids compare arms directly. Resumes like ``stda explain`` does.
    """
    from stda_hf.explain import ExplainConfig, run_explain

    view = fold_dir(cfg, key.fold, key.repeat) / "real"
    settings = ExplainConfig(**{**DEFAULT_EXPLAIN, **cfg.explain})
    summary = run_explain(run_dir, run_dir / EXPLAIN_DIR, settings, images=view, overwrite=True)
    keep = ("relevance_", *AREA_METRICS)
    numbers = {k: v for k, v in summary.numbers.items() if k.startswith(keep)}
    return numbers | {f"untrained_{k}": v for k, v in (summary.numbers.get("untrained") or {}).items()}


def reliance_run(cfg: BenchmarkConfig, key: RunKey, run_dir: Path) -> dict[str, float]:
    """Reliance of one finished run on the planted shortcut, on its fold's test images (``benchmark/reliance.py``)."""
    from stda_hf.benchmark.reliance import measure_reliance
    from stda_hf.models.vgg import load_model

    _, splits = shortcut_phantom_settings(cfg.phantoms, cfg.shortcut)
    root = cfg.work_dir / ("phantoms-shortcut" if "test" in splits else "phantoms")
    view = read_real_folder(fold_dir(cfg, key.fold, key.repeat) / "real")
    source = read_real_folder(root)
    images = [source[im.isic_id] for im in view.subset("test")]
    model, pre = load_model(run_dir)
    return measure_reliance(model, pre, root, images, cfg.shortcut["artifact"])


def reliance_runs(cfg: BenchmarkConfig, table: RunTable) -> None:
    """Add the reliance measures to every finished run of a shortcut benchmark that lacks them."""
    from stda_hf.core.utils import progress

    if not cfg.shortcut:
        return
    done = [k for k in sorted(table.rows) if table.rows[k]["status"] == "done"]
    todo = [k for k in done if table.rows[k].get("reliance") is None]
    for key in progress(todo, desc="reliance", unit="run"):
        row = dict(table.rows[key])
        try:
            row.update(reliance_run(cfg, key, cfg.work_dir / str(row["run_dir"])))
        except Exception as err:  # a measurement failure is recorded; the run's metrics stand
            logger.warning("measuring reliance of %s failed: %s", key.name, err)
            row["error"] = f"reliance: {type(err).__name__}: {err}"
        table.record(key, **row)


def explain_runs(cfg: BenchmarkConfig, table: RunTable) -> None:
    """Add explanation numbers to every finished run (a failure is noted in the row, the run stays done)."""
    from stda_hf.core.utils import progress

    if not cfg.explain:
        return
    done = [k for k in sorted(table.rows) if table.rows[k]["status"] == "done"]
    for key in progress(done, desc="explain runs", unit="run"):
        row = dict(table.rows[key])
        try:
            row.update(explain_run(cfg, key, cfg.work_dir / str(row["run_dir"])), error="")
        except Exception as err:  # explanations are extra: a failure is recorded, the run's metrics stand
            logger.warning("explaining %s failed: %s", key.name, err)
            row["error"] = f"explain: {type(err).__name__}: {err}"
        table.record(key, **row)
