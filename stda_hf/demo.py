"""``stda demo``: the whole flow on phantoms, offline, small enough for two CPU cores.

Each step calls the same stage function the matching ``stda`` command calls, with small settings, and writes
into one folder per stage under ``out`` (``real/``, ...), so a user can open every intermediate result.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .phantoms import PhantomConfig, make_phantoms
from .real import inspect_folder
from .split import SplitConfig, make_splits

logger = logging.getLogger(__name__)


def run_demo(out: str | Path, n: int = 400, size: int = 64, seed: int = 0) -> Path:
    """Run phantoms -> split -> inspect (and the later stages as they land) into ``out``; return ``out``."""
    out = Path(out)
    real = out / "real"
    _step("phantoms", f"{n} phantom lesions at {size}px -> {real}")
    make_phantoms(real, PhantomConfig(n=n, size=size, seed=seed), overwrite=True)
    _step("split", "grouped by lesion, patient and near-duplicates, stratified by class")
    make_splits(real, SplitConfig(seed=seed))
    _step("inspect", str(real))
    print(inspect_folder(real).format())
    _generate_step(out, real, size, seed)
    hub = _package_step(out, real)
    _train_step(out, hub, size, seed)
    return out


def _generate_step(out: Path, real: Path, size: int, seed: int) -> Path:
    """Restyle benign train phantoms with malignant train ones (random VGG weights: offline, shows the plumbing)."""
    from .errors import StdaError
    from .generate import GenerateConfig, generate

    synthetic = out / "synthetic"
    cfg = GenerateConfig(
        weights="random", size=size, iterations=10, per_content=1, limit=24, batch=12, seed=seed
    )
    _step("generate", f"{cfg.limit} style transfers, {cfg.iterations} L-BFGS steps, {size}px -> {synthetic}")
    try:
        summary = generate(real, synthetic, cfg)
    except StdaError:  # made from an earlier demo's phantoms or settings: start afresh
        shutil.rmtree(synthetic, ignore_errors=True)
        summary = generate(real, synthetic, cfg)
    print(summary.format())
    return synthetic


def _package_step(out: Path, real: Path) -> Path:
    """Package the real images, and the synthetic ones once they carry pseudo-labels, as a Hub dataset."""
    from .package import package

    synthetic = out / "synthetic"
    labelled = (synthetic / "labels.jsonl").is_file()
    hub = out / "hub" / "skin-lesions"
    _step("package", f"{'real + synthetic' if labelled else 'real'} images -> {hub}")
    result = package(real, hub, synthetic=synthetic if labelled else None)
    rows = ", ".join(f"{split} {sum(c.values())}" for split, c in result.counts.items())
    print(f"{rows}; licence {result.license}; load it with datasets.load_dataset({str(hub)!r})")
    return hub


def _train_step(out: Path, hub: Path, size: int, seed: int) -> Path:
    """Train a small VGG8 on the packaged dataset, with its synthetic split mixed in when it has one."""
    from .training import TrainConfig, run_training

    synthetic = "mix" if any((hub / "data").glob("synthetic-*")) else "none"
    run = out / "runs" / f"vgg8-{synthetic}"
    _step("train", f"VGG8, {'real + synthetic' if synthetic == 'mix' else 'real'} images, 15 epochs -> {run}")
    cfg = TrainConfig(
        dataset=str(hub), output_dir=str(run), synthetic=synthetic, image_size=size,
        vgg8_widths=(32, 64, 128, 128, 256), vgg8_hidden=(256, 256), epochs=15, batch_size=32,
        num_workers=0, seed=seed, overwrite=True,
    )  # fmt: skip
    result = run_training(cfg)
    test = result.test or {}
    print(
        f"test ROC AUC {test.get('roc_auc', float('nan')):.3f}, balanced accuracy "
        f"{test.get('balanced_accuracy', float('nan')):.3f} (model of epoch {result.best_epoch}); "
        f"model and card in {run / 'model'}"
    )
    return run


def _step(name: str, what: str) -> None:
    print(f"\n== {name}: {what}", flush=True)
