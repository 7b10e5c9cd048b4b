"""``stda demo``: the whole flow on phantoms, offline, small enough for two CPU cores.

phantoms -> split -> inspect -> package (real only) -> teacher (VGG8 on real train images; also the baseline)
-> generate -> label -> package (real + synthetic) -> load_dataset -> VGG8 with synthetic images mixed in ->
explain both models on the same test images. Each step calls the same stage function the matching ``stda``
command (or ``train.py``) calls, with small settings, and writes into its own folder under ``out``, so every
intermediate result can be opened. Style transfer uses the pretrained feed-forward engine by default
(``engine="arbitrary"``: Magenta's arbitrary-style network from the ``stda-hf[arbitrary]`` extra, offline, a
fraction of a second per image); ``engine="gatys"`` (``stda demo --engine gatys``) runs the paper's optimisation on
the ImageNet VGG19 of the ``stda-hf[imagenet]`` extra instead, also offline, in minutes rather than seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from stda_hf.core.errors import StdaError
from stda_hf.data.inspect import inspect_folder
from stda_hf.data.phantoms import PhantomConfig, make_phantoms
from stda_hf.data.split import SplitConfig, make_splits

logger = logging.getLogger(__name__)


DEMO_ENGINES = ("arbitrary", "gatys")


def run_demo(
    out: str | Path, n: int = 400, size: int = 64, seed: int = 0, epochs: int = 15, engine: str = "arbitrary"
) -> Path:
    """Run the whole flow into ``out`` and print what each step made; return ``out``.

    ``engine`` is the style-transfer engine: ``arbitrary`` (the pretrained network, fast) or ``gatys`` (the
    paper's optimisation on the default VGG weights, ``vgg19-imagenet`` when the imagenet extra is installed).
    """
    if engine not in DEMO_ENGINES:
        raise StdaError(f"unknown --engine {engine!r}; valid engines: {list(DEMO_ENGINES)}")
    out = Path(out)
    _check_engine(engine)
    real = out / "real"
    _step("phantoms", f"{n} phantom lesions at {size}px -> {real}")
    make_phantoms(real, PhantomConfig(n=n, size=size, seed=seed), overwrite=True)
    _step("split", "grouped by lesion, patient and near-duplicates, stratified by class")
    make_splits(real, SplitConfig(seed=seed))
    _step("inspect", str(real))
    print(inspect_folder(real).format())
    hub_real = _package_step(real, None, out / "hub" / "real-only")
    teacher = _train_step(out / "runs" / "teacher", hub_real, "none", size, seed, epochs)
    synthetic = _generate_step(out, real, size, seed, engine)
    _label_step(synthetic, teacher, real)
    hub = _package_step(real, synthetic, out / "hub" / "skin-lesions")
    _load_step(hub)
    stda = _train_step(out / "runs" / "vgg8-stda", hub, "mix", size, seed, epochs)
    _explain_step(out, real, {"baseline (teacher)": teacher, "ST-DA": stda})
    return out


def _check_engine(engine: str) -> None:
    """Load the arbitrary-style networks once, so a missing ``stda-hf[arbitrary]`` extra stops the demo at its
    start (one line, exit 2) rather than after the teacher's training."""
    from stda_hf.generate import load_arbitrary_models

    if engine == "arbitrary":
        load_arbitrary_models("cpu")


def _generate_step(out: Path, real: Path, size: int, seed: int, engine: str) -> Path:
    """Restyle benign train phantoms with malignant train ones with ``engine``."""
    from stda_hf.generate import ENGINE_FILE, GenerateConfig, QualityGateFailed, generate

    synthetic = out / "synthetic"
    # the arbitrary network cannot render a region's statistics: region-aware (what `auto` picks on phantoms,
    # which have masks) it left 21 of 24 of the demo's lesions `unchanged` or `content_lost` by the gate
    regions = "none" if engine == "arbitrary" else "auto"
    cfg = GenerateConfig(
        engine=engine, size=size, per_content=1, limit=24, batch=12, seed=seed, regions=regions
    )
    _step("generate", f"{cfg.limit} style transfers with --engine {engine}, {size}px -> {synthetic}")
    if synthetic.is_symlink() or (synthetic.exists() and not (synthetic / "generate.yaml").is_file()):
        raise StdaError(
            f"{synthetic} was not made by `stda generate` (no generate.yaml) and the demo would replace it; "
            "move it away or choose another --out"
        )
    shutil.rmtree(synthetic, ignore_errors=True)  # made from an earlier demo's phantoms: start afresh
    try:
        summary = generate(real, synthetic, cfg)
    except QualityGateFailed as err:  # keep going: label and package leave the failed images out
        summary = err.summary
        print(f"quality gate: {err}")
    used = json.loads((synthetic / ENGINE_FILE).read_text(encoding="utf-8"))
    if engine == "arbitrary":
        print(
            f"engine: arbitrary (Magenta's pretrained arbitrary-style network, {used['package']}, "
            f"{used['provider']}; `stda demo --engine gatys` runs the paper's Gatys optimisation instead)\n"
            "regions: none (whole frame: the style's artifacts come with it; this network cannot render a "
            "region's statistics, docs/generate.md; --engine gatys is region-aware)"
        )
    else:
        print(
            f"engine: gatys ({cfg.preset} preset, {cfg.iterations} L-BFGS evaluations, VGG weights {used['weights']})"
        )
    print(summary.format())
    return synthetic


def _label_step(synthetic: Path, teacher: Path, real: Path) -> None:
    """Pseudo-label the synthetic images with the teacher, Platt-calibrated on the real validation split."""
    from stda_hf.label import LABELS_FILE, LabelConfig, label_synthetic

    _step("label", f"teacher {teacher}, calibrated on the real validation split")
    (synthetic / LABELS_FILE).unlink(missing_ok=True)  # a fresh teacher each demo: relabel everything
    (synthetic / "calibration.json").unlink(missing_ok=True)
    # images that failed the quality gate are not labelled, and `stda package` leaves them out (both defaults)
    cfg = LabelConfig(teacher=str(teacher), real=str(real), calibrate=True, min_confidence=0.8)
    s = label_synthetic(synthetic, cfg)
    c = s.calibration
    print(f"labels {s.labels}; Platt scale {c['scale']:.2f}, bias {c['bias']:+.2f}; {s.kept} of {s.images} at "
          f"confidence >= 0.8\nECE {c['ece_before']:.3f} -> {c['ece_after']:.3f} (after: on {c['ece_after_on']})")  # fmt: skip


def _package_step(real: Path, synthetic: Path | None, hub: Path) -> Path:
    """Package the real images (and the labelled synthetic ones, when given) as a Hub dataset folder."""
    from stda_hf.dataset import package

    _step("package", f"{'real + synthetic' if synthetic else 'real'} images -> {hub}")
    result = package(real, hub, synthetic=synthetic)
    rows = ", ".join(f"{split} {sum(c.values())}" for split, c in result.counts.items())
    print(f"{rows}; licence {result.license}")
    if result.left_out_failed:
        left = ", ".join(f"{n} {v}" for v, n in result.left_out_failed.items())
        print(
            f"left out {sum(result.left_out_failed.values())} synthetic images that failed the quality gate ({left})"
        )
    return hub


def _load_step(hub: Path) -> None:
    """Load the packaged folder as a user would, with ``datasets.load_dataset``."""
    import datasets

    _step("load", f"datasets.load_dataset({str(hub)!r})")
    ds = datasets.load_dataset(str(hub))
    print(ds)
    print(f"label names: {ds['train'].features['label'].names}")


def _train_step(run: Path, hub: Path, synthetic: str, size: int, seed: int, epochs: int) -> Path:
    """Train a small VGG8 on the packaged dataset: real images only, or with the synthetic split mixed in."""
    from stda_hf.training import TrainConfig, run_training

    what = "real + synthetic (mix)" if synthetic == "mix" else "real train images only"
    _step("train", f"VGG8 on {what}, {epochs} epochs -> {run}")
    cfg = TrainConfig(
        dataset=str(hub), output_dir=str(run), synthetic=synthetic, image_size=size,
        vgg8_widths=(32, 64, 128, 128, 256), vgg8_hidden=(256, 256), epochs=epochs, batch_size=32,
        num_workers=0, seed=seed, overwrite=True, explain_images=8,
    )  # fmt: skip
    result = run_training(cfg)
    test = result.test or {}
    print(
        f"test ROC AUC {test.get('roc_auc', float('nan')):.3f}, balanced accuracy "
        f"{test.get('balanced_accuracy', float('nan')):.3f} (model of epoch {result.best_epoch}); "
        f"model, card and heatmaps in {run}"
    )
    return run


def _explain_step(out: Path, real: Path, models: dict[str, Path]) -> None:
    """Explain each model on the same real test images with DTD and print the relevance numbers side by side."""
    from stda_hf.explain import ExplainConfig, run_explain

    _step("explain", "Deep Taylor Decomposition of each model on the real test images")
    for name, run in models.items():
        folder = out / "explanations" / run.name
        summary = run_explain(run, folder, ExplainConfig(split="test", grid=16), images=real, overwrite=True)
        print(f"-- {name}: grid {folder / 'grid.png'}")
        print(summary.format())


def _step(name: str, what: str) -> None:
    print(f"\n== {name}: {what}", flush=True)
