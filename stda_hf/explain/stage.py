"""The ``stda explain`` stage: explain a trained model on a folder or dataset split; PNGs and numbers out.

    stda explain --model runs/vgg8 --images real/ --split validation --out heatmaps/

:func:`run_explain` reads images (a real-image folder, a plain folder of images, or a split of a packaged
dataset), explains them in batches with :mod:`stda_hf.attribution.engine` (Deep Taylor Decomposition by default),
measures where the relevance lies with :mod:`stda_hf.attribution.relevance`, and writes heatmaps, overlays, a grid,
``relevance.jsonl``/``relevance.csv`` and ``summary.json``; a re-run resumes. The engine's names are
re-exported here for callers of the earlier single module.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from stda_hf import LABELS
from stda_hf.attribution.engine import (
    OUTPUTS,
    check_composite_name,
    untrained_copy,
)
from stda_hf.attribution.heatmaps import COLORMAPS, overlay, save_grid, save_heatmap
from stda_hf.attribution.hook import (
    Result,
    Sample,
    explain_samples,
    results_grid,
    row_samples,
)
from stda_hf.attribution.relevance import is_defined, mean_or_none, summarize
from stda_hf.core.config import changed_settings, config_to_dict, describe_changes, read_settings
from stda_hf.core.devices import resolve_device
from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.fileio import append_jsonl, check_separate, csv_text, write_json, write_text
from stda_hf.core.statefile import Fields, read_records
from stda_hf.core.utils import progress
from stda_hf.data.images import IMAGE_EXTENSIONS, SkipReport, iter_images, load_image, save_image
from stda_hf.data.real import ARTIFACTS, RealFolder, RealImage, read_real_folder
from stda_hf.models.vgg import eval_transform, load_model, model_folder

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Images to explain: from a folder or a dataset split


def open_source(
    images: str | Path | None, dataset: str | None, split: str, report: SkipReport
) -> tuple[Iterator[Sample], int]:
    """The images to explain, from a folder or a dataset split, and how many there are.

    Everything that can be refused (missing folder, unknown split, no images) is refused here, before any
    image is read; unreadable images are skipped later and go to ``report``.
    """
    if images is not None:
        return folder_source(images, split, report)
    ds = load_split(dataset, split)
    return row_samples(ds, report), len(ds)


def folder_source(root: str | Path, split: str, report: SkipReport) -> tuple[Iterator[Sample], int]:
    """Images of a real-image folder (``split`` of ``splits.csv``, or ``all``) or a plain folder of images.

    Masks come from ``masks/<id>.png``; artifact maps from ``artifacts/<id>.png`` in a phantom folder, where a
    missing file means no artifact. Returns the samples (read lazily) and their number.
    """
    root = Path(root)
    if not root.is_dir():
        raise StdaError(f"--images {root}: folder not found")
    if (root / "metadata.csv").is_file() or any((root / label).is_dir() for label in LABELS):
        folder = read_real_folder(root)
        chosen = _real_images(folder, split)
        return _real_samples(folder, chosen, report), len(chosen)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise StdaError(
            f"--images {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no metadata.csv; give a folder "
            "of images or a real-image folder"
        )
    return _plain_samples(root, files, report), len(files)


def _real_images(folder: RealFolder, split: str) -> list[RealImage]:
    if split == "all":
        return folder.labelled
    if not folder.splits_path.is_file():
        logger.info("%s has no splits.csv: explaining every labelled image", folder.root)
        return folder.labelled
    return folder.subset(split)


def _real_samples(folder: RealFolder, images: list[RealImage], report: SkipReport) -> Iterator[Sample]:
    knows_artifacts = (folder.root / "artifacts").is_dir() or (folder.root / "phantoms.yaml").is_file()
    for im in images:
        try:
            image = load_image(im.path)
            mask = _read_map(im.mask_path)
            artifacts = _read_map(im.artifact_path)
        except BadImageError as err:
            report.add(err.path, err.reason)
            continue
        if artifacts is None and knows_artifacts:
            artifacts = np.zeros((image.height, image.width), np.uint8)
        yield Sample(im.isic_id, image, im.label, "real", mask, artifacts)


def _plain_samples(root: Path, files: list[Path], report: SkipReport) -> Iterator[Sample]:
    ids: set[str] = set()
    for path, image in iter_images(files, report):
        mask_path = root / "masks" / f"{path.stem}.png"
        try:
            mask = _read_map(mask_path if mask_path.is_file() else None)
        except BadImageError as err:
            report.add(err.path, err.reason)
            continue
        yield Sample(_file_id(path.stem, ids), image, None, "unknown", mask, None)


def _file_id(stem: str, taken: set[str]) -> str:
    """An output-file-safe id from a file name (unsafe characters become ``_``), unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("._-")[:120] or "image"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    taken.add(candidate)
    return candidate


def _read_map(path: Path | None) -> np.ndarray | None:
    """A mask or label map as a 2-D uint8 array, or None when there is none."""
    if path is None:
        return None
    return np.asarray(load_image(path).convert("L"))


def load_split(name: str, split: str):
    """Split ``split`` of a Hub dataset (id) or a local folder written by ``stda package``, checked for images."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise StdaError(
            f"cannot load split {split!r} of dataset {name!r} ({type(err).__name__}: {err}); give a folder "
            "written by `stda package` or a Hub id, and a split it has (train, synthetic, validation, test)"
        ) from err
    if "image" not in ds.column_names:
        raise StdaError(f"dataset {name!r} split {split!r} has no 'image' column; columns: {ds.column_names}")
    return ds


# ----------------------------------------------------------------------------------------------------------------
# The stage: stda explain


@dataclass
class ExplainConfig:
    """Settings of ``stda explain``."""

    method: str = (
        "dtd"  # dtd (Deep Taylor Decomposition), gradient, or a zennit composite such as epsilon_plus_flat
    )
    output: str = "log_odds"  # score explained: log_odds (the class against the others) or logit (raw logit)
    target: str = "predicted"  # class explained: predicted, true, benign or malignant
    split: str = "validation"  # split of the dataset or split real-image folder to explain (all: every image)
    limit: int = 0  # explain at most this many images (0: all)
    batch_size: int = 16  # images per forward and backward pass
    grid: int = 16  # images shown in grid.png (0: no grid)
    columns: int = 4  # images per grid row (each shows the input and its heatmap)
    colormap: str = "bwr"  # heatmap colours: bwr, coldnhot or wred
    device: str = "auto"  # auto (cuda when available), cpu, cuda or cuda:N
    reference: str = "untrained"
    # ^ untrained: every share beside the same share of the same architecture with re-initialised weights (the
    #   reference level a share is read against: Adebayo et al. 2018), at twice the cost; none: skip it

    def __post_init__(self) -> None:
        check_composite_name(self.method)
        _choice("output", self.output, OUTPUTS)
        _choice("target", self.target, ("predicted", "true", *LABELS))
        _choice("colormap", self.colormap, tuple(COLORMAPS))
        _choice("reference", self.reference, REFERENCES)
        for name, low in (("limit", 0), ("batch_size", 1), ("grid", 0), ("columns", 1)):
            if getattr(self, name) < low:
                raise StdaError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least {low}")


REFERENCES = ("untrained", "none")
UNTRAINED = "untrained_"
"""Prefix of the untrained reference's numbers in ``relevance.jsonl``/``.csv``."""


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise StdaError(f"--{name} {value!r}: valid values are {', '.join(valid)}")


@dataclass
class ExplainSummary:
    """What ``stda explain`` wrote."""

    out: Path
    explained: int  # images explained in this run (earlier runs' images are kept, not redone)
    total: int  # images in relevance.jsonl
    skipped: int  # unreadable images skipped
    numbers: dict[str, float | int | None]  # summary.json

    def format(self) -> str:
        """What the command line prints: counts, the two headline numbers, and where the files are."""
        n = self.numbers
        lines = [f"explained {self.explained} image(s) now, {self.total} in all, with {n['method']}"]
        for share, count, what in (
            ("relevance_in_mask", "n_with_mask", "inside the lesion mask"),
            ("relevance_on_artifact", "n_with_artifact", "on artifacts"),
        ):
            value = (
                "unavailable (no masks)" if n[share] is None else f"{n[share]:.3f} over {n[count]} image(s)"
            )
            reference = (n.get("untrained") or {}).get(share)
            if n[share] is not None and reference is not None:
                value += f" (untrained model of the same architecture: {reference:.3f})"
            lines.append(f"positive relevance {what}: {value}")
        if self.skipped:
            lines.append(f"skipped {self.skipped} unreadable image(s); see {self.out / 'skipped.json'}")
        lines.append(f"wrote {self.out / 'summary.json'}, relevance.csv, grid.png, heatmaps/ and overlays/")
        return "\n".join(lines)


OUTPUT_FILES = ("relevance.jsonl", "relevance.csv", "summary.json", "grid.png", "skipped.json")


OUTPUT_DIRS = ("heatmaps", "overlays")


def run_explain(
    model_dir: str | Path,
    out: str | Path,
    cfg: ExplainConfig | None = None,
    images: str | Path | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
) -> ExplainSummary:
    """Explain the images of a folder or dataset split with a saved model; write heatmaps and numbers.

    Writes into ``out``: ``heatmaps/<id>.png`` (relevance at the model's input size), ``overlays/<id>.png``
    (relevance over the image), ``grid.png`` (the first images with prediction, true label and origin),
    ``relevance.jsonl`` and ``relevance.csv`` (one row per image), ``summary.json`` (averages, as the
    ``relevance_localization`` measurement computes them) and ``explain.yaml`` (the settings). An interrupted
    run resumes: images already in ``relevance.jsonl`` are not explained again.

    Parameters
    ----------
    model_dir : path
        A ``train.py`` run folder, or the model folder in it (``config.json`` + ``model.safetensors``).
    out : path
        Output folder.
    cfg : ExplainConfig, optional
        Method, target, split, limit, grid and device settings.
    images, dataset : optional
        Exactly one: a folder (real-image folder or plain images), or a dataset id / ``stda package`` folder.
    overwrite : bool
        Replace results of other settings in ``out`` instead of refusing.

    Raises
    ------
    StdaError
        Both or neither source, unreadable model, unknown split, ``out`` holding results of other settings.
    """
    cfg = cfg or ExplainConfig()
    if (images is None) == (dataset is None):
        raise StdaError("give exactly one of --images DIR or --dataset NAME_OR_FOLDER")
    out = Path(out)
    local = dataset if dataset is not None and Path(dataset).is_dir() else None
    check_separate(out, {"image folder": images, "dataset folder": local})
    model, pre, device = _load_for_explain(model_dir, cfg.device)
    report = SkipReport()
    source, total = open_source(images, dataset, cfg.split, report)
    _prepare_out(out, _settings(model_dir, images, dataset, cfg), overwrite)
    if cfg.limit:
        source, total = itertools.islice(source, cfg.limit), min(total, cfg.limit)
    transform = eval_transform(pre)
    model = model.to(device)

    untrained = untrained_copy(model) if cfg.reference == "untrained" else None

    def explain(samples: list[Sample]) -> list[Result]:
        args = (samples, transform, pre.mean, pre.std, cfg.method, cfg.output, cfg.target)
        results = explain_samples(model, *args, resize=pre.resize)
        if untrained is not None:
            reference_results = explain_samples(untrained, *args, resize=pre.resize)
            for result, reference in zip(results, reference_results, strict=True):
                result.numbers.update(
                    {f"{UNTRAINED}{k}": v for k, v in reference.numbers.items() if k in SHARES}
                )
        return results

    done = {r["id"] for r in _read_relevance(out)}
    n_new, shown = _explain_all(source, total, done, explain, out, cfg)
    return _finish(out, cfg, explain, shown, n_new, report)


def _read_relevance(out: Path) -> list[dict]:
    """The records of ``relevance.jsonl`` (one per explained image): schema-checked, ids unique."""
    recover = "delete that line (its image is explained again on the next run) or delete the file"
    return read_records(out / "relevance.jsonl", Fields(required={"id": str}), key="id", recover=recover)


def _load_for_explain(model_dir: str | Path, device: str):
    torch_device = resolve_device(device)
    model, pre = load_model(model_folder(model_dir))
    return model, pre, torch_device


def _settings(model_dir, images, dataset, cfg: ExplainConfig) -> dict:
    """What makes two runs the same: the model file, the source and the settings (resume needs all equal)."""
    model_dir = model_folder(model_dir).resolve()
    weights = model_dir / "model.safetensors"
    stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None
    source = {"images": str(Path(images).resolve())} if images else {"dataset": str(dataset)}
    return {"model": str(model_dir), "model_file": stamp, **source, **config_to_dict(cfg)}


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> None:
    """Resume in ``out`` when its settings match; refuse other results unless ``overwrite``."""
    path, text = out / "explain.yaml", yaml.safe_dump(settings, sort_keys=False)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    if path.is_file() and not overwrite:
        saved = read_settings(path) or {}
        changes = describe_changes(saved, settings, changed_settings(saved, settings))
        raise StdaError(
            f"{out} holds explanations made with another model, source or settings ({changes or 'see ' + str(path)});"
            " pass --overwrite to replace them, or another --out"
        )
    if (
        not path.is_file() and out.is_dir() and any(out.iterdir())
    ):  # --overwrite replaces only explain's results
        raise StdaError(f"--out {out} is not empty and holds no explain.yaml; give a new or empty folder")
    _clear(out)
    write_text(path, text)


def _clear(out: Path) -> None:
    """Remove what an earlier ``stda explain`` wrote in ``out`` (and nothing else)."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def _batches(source: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    it = iter(source)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _explain_all(
    source, total: int, done: set[str], explain, out: Path, cfg: ExplainConfig
) -> tuple[int, list]:
    """Explain every sample not in ``done``; returns the count and the first ``cfg.grid`` for the grid.

    A grid entry is a :class:`Result` when explained now, the :class:`Sample` when an earlier run did it.
    """
    shown: list[Result | Sample] = []
    n_new = 0
    with progress(total=total, desc=f"explain ({cfg.method})", unit="img") as bar:
        for batch in _batches(source, cfg.batch_size):
            results = {r.sample.id: r for r in explain([s for s in batch if s.id not in done])}
            for result in results.values():
                _write_result(out, result, cfg.colormap)
                done.add(result.sample.id)
            shown += [results.get(s.id, s) for s in batch][: max(0, cfg.grid - len(shown))]
            n_new += len(results)
            bar.update(len(batch))
    return n_new, shown


def _write_result(out: Path, result: Result, cmap: str) -> None:
    """Heatmap and overlay PNGs first, then the record: a record means its files are complete."""
    name = f"{result.sample.id}.png"
    save_heatmap(result.pixels, out / "heatmaps" / name, cmap)
    save_image(overlay(result.input_image, result.pixels, cmap), out / "overlays" / name)
    append_jsonl(out / "relevance.jsonl", result.record())


def _finish(
    out: Path, cfg: ExplainConfig, explain, shown: list, n_new: int, report: SkipReport
) -> ExplainSummary:
    records = _read_relevance(out)
    if report:
        report.save(out / "skipped.json")
        logger.warning("%s (listed in %s)", report.summary(), out / "skipped.json")
    if not records:
        raise StdaError(
            f"nothing to explain: split {cfg.split!r} of the source is empty or every image was unreadable"
        )
    write_text(out / "relevance.csv", _csv(records))
    numbers = run_numbers(records, cfg)
    write_json(out / "summary.json", numbers)
    if cfg.grid and shown:
        again = {r.sample.id: r for r in explain([s for s in shown if isinstance(s, Sample)])}
        results = [again[s.id] if isinstance(s, Sample) else s for s in shown]
        title = f"{cfg.method}, explaining the {cfg.target} class ({cfg.output})"
        save_grid(results_grid(results, cfg.columns, title, cfg.colormap), out / "grid.png")
    return ExplainSummary(out, n_new, len(records), len(report), numbers)


def run_numbers(records: list[dict], cfg: ExplainConfig) -> dict:
    """``summary.json``: the method, the localization averages (:func:`summarize`) and the DTD checks."""
    numbers: dict = {"method": cfg.method, "output": cfg.output, "target": cfg.target}
    numbers.update(summarize(records))
    if cfg.reference == "untrained":  # the same images and areas, the untrained model's shares
        reference = summarize([{**r, **{s: r.get(UNTRAINED + s) for s in SHARES}} for r in records])
        numbers["untrained"] = {k: v for k, v in reference.items() if k in SHARES}
    for key in ("conservation", "negative_fraction"):
        numbers[f"{key}_mean"] = mean_or_none([r[key] for r in records if is_defined(r.get(key))])
    labelled = [r for r in records if r.get("label") is not None]
    numbers["accuracy"] = mean_or_none([float(r["predicted"] == r["label"]) for r in labelled])
    return numbers


SHARES = ("relevance_in_mask", "relevance_on_artifact", *(f"relevance_on_{kind}" for kind in ARTIFACTS))
"""The relevance shares of an image (each also measured for the untrained reference)."""

RECORD_FIELDS = (
    "id",
    "label",
    "origin",
    "predicted",
    "prob_malignant",
    "target",
    "explained",
    "conservation",
    "negative_fraction",
    "relevance_in_mask",
    "mask_area",
    "relevance_on_artifact",
    "artifact_area",
    *(f"relevance_on_{kind}" for kind in ARTIFACTS),
    *(f"{UNTRAINED}{share}" for share in SHARES),
)
"""Columns of ``relevance.csv``, in order: each share and area, then the untrained reference's shares."""


def _csv(records: list[dict]) -> str:
    return csv_text(({k: "" if v is None else v for k, v in r.items()} for r in records), RECORD_FIELDS)
