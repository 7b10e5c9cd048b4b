"""Benchmark data: phantoms or the user's folder, and one leakage-free view of it per fold."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from stda_hf.benchmark.config import SPLIT_ORDER, BenchmarkConfig
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import write_text

logger = logging.getLogger(__name__)


def prepare_sources(cfg: BenchmarkConfig) -> dict[str, Path]:
    """``{split: real-image folder}`` the fold views draw each split's images from.

    Real data: the user's folder for every split. Phantoms: one folder made with ``cfg.phantoms``; with a
    ``shortcut`` a second folder of the same phantoms with the artifact planted serves the shortcut's splits.
    """
    if cfg.real:
        root = Path(cfg.real)
        return dict.fromkeys(SPLIT_ORDER, root)
    clean = _make_phantoms(cfg.work_dir / "phantoms", dict(cfg.phantoms))
    sources = dict.fromkeys(SPLIT_ORDER, clean)
    if cfg.shortcut:
        settings, splits = shortcut_phantom_settings(cfg.phantoms, cfg.shortcut)
        planted = _make_phantoms(cfg.work_dir / "phantoms-shortcut", settings)
        sources.update(dict.fromkeys(splits, planted))
    return sources


def shortcut_phantom_settings(phantoms: dict[str, Any], shortcut: dict[str, Any]) -> tuple[dict, list[str]]:
    """Phantom settings with the shortcut artifact planted, and the splits that get them.

    Raises
    ------
    StdaError
        Unknown keys, artifact or split in ``shortcut``.
    """
    from stda_hf.data.phantoms import DEFAULT_ARTIFACT_RATES
    from stda_hf.data.real import ARTIFACTS

    known = {"artifact", "benign", "malignant", "splits"}
    if set(shortcut) - known or "artifact" not in shortcut:
        raise StdaError(
            f"shortcut {shortcut}: give artifact (one of {list(ARTIFACTS)}) and optionally {sorted(known)}"
        )
    if shortcut["artifact"] not in ARTIFACTS:
        raise StdaError(f"shortcut artifact {shortcut['artifact']!r}; valid: {list(ARTIFACTS)}")
    splits = list(shortcut.get("splits", ["train"]))
    if not splits or set(splits) - set(SPLIT_ORDER):
        raise StdaError(f"shortcut splits {splits}; choose among {list(SPLIT_ORDER)}")
    rates = dict(phantoms.get("artifacts", DEFAULT_ARTIFACT_RATES))
    rates[shortcut["artifact"]] = (float(shortcut.get("benign", 1.0)), float(shortcut.get("malignant", 0.0)))
    return {**phantoms, "artifacts": rates}, splits


def _make_phantoms(root: Path, settings: dict[str, Any]) -> Path:
    """Make the phantom folder unless it already holds exactly these settings (resume skips it)."""
    import yaml

    from stda_hf.core.config import config_to_dict
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms

    cfg = PhantomConfig(**settings)
    saved = root / "phantoms.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") == yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False
    ):
        return root
    logger.info("making %d phantoms (%d px) in %s", cfg.n, cfg.size, root)
    make_phantoms(root, cfg, overwrite=True)
    return root


def write_fold_view(dest: Path, folds, fold: int, sources: dict[str, Path]) -> Path:
    """A real-image folder for one fold: links to each image (from its split's source), metadata, splits.csv.

    Only the fold's images are listed; masks and artifact maps are linked too. Re-writing a view is cheap and
    gives the same folder, so resumed benchmarks simply rebuild it.
    """
    from stda_hf.data.licenses import write_attribution
    from stda_hf.data.real import read_real_folder, write_metadata

    readers = {root: read_real_folder(root) for root in set(sources.values())}
    assignment = folds.assignments[fold]
    images = [readers[sources[assignment[im.isic_id]]][im.isic_id] for im in folds.images]
    for sub, attr in (("images", "path"), ("masks", "mask_path"), ("artifacts", "artifact_path")):
        _link_files(dest / sub, [getattr(im, attr) for im in images if getattr(im, attr) is not None])
    rows = [_metadata_row(im) for im in images]
    write_metadata(dest, rows)
    write_text(dest / "splits.csv", folds.splits_csv(fold))
    write_attribution(dest, rows, title=f"Attribution: fold {fold} of the benchmark's images")
    return dest


def _link_files(folder: Path, targets: list[Path]) -> None:
    """Make ``folder`` hold exactly one symbolic link per target, named like it."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {t.name: t.resolve() for t in targets}
    for entry in folder.iterdir():
        if entry.name not in wanted or not entry.is_symlink() or entry.resolve() != wanted[entry.name]:
            entry.unlink()
    for name, target in wanted.items():
        if not (folder / name).is_symlink():
            os.symlink(target, folder / name)


def _metadata_row(im) -> dict[str, str]:
    from stda_hf.data.real import REQUIRED_COLUMNS

    row = {c: getattr(im, c) for c in REQUIRED_COLUMNS}
    return {**row, **{k: v for k, v in im.extra.items() if k not in row}}


def check_fold_synthetic(view: Path, synthetic: Path) -> int:
    """Refuse synthetic images whose content or style image is not in this fold's train split; return the count.

    Raises
    ------
    StdaError
        Naming the offending synthetic ids and their source images.
    """
    from stda_hf.core.fileio import read_jsonl
    from stda_hf.core.utils import first_few
    from stda_hf.data.real import read_real_folder, untrained_sources

    folder = read_real_folder(view)
    records = read_jsonl(synthetic / "manifest.jsonl")
    bad = untrained_sources(records, folder, folder.splits())
    if bad:
        raise StdaError(
            f"{synthetic}: {len(bad)} synthetic image source(s) lie outside the train split of {view}: "
            f"{first_few(bad, 3)}; delete {synthetic} and re-run the benchmark"
        )
    return len(records)
