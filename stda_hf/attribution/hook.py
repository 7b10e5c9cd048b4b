"""Explaining images a caller already holds: samples, results and grids, and ``train.py``'s evaluation hook.

:func:`explain_samples` turns a batch of :class:`Sample` (an image with what is known about it) into
:class:`Result` (relevance map, prediction, DTD checks, localisation numbers) through
:func:`stda_hf.attribution.engine.explain_batch`; :func:`results_grid` draws them. :func:`explain_hook` is the
``on_evaluate`` hook of :func:`stda_hf.training.run_training`: it explains a fixed set of validation images at
every evaluation and logs the grid and the numbers. The ``stda explain`` stage (:mod:`stda_hf.explain.stage`) reads
folders and datasets into the same samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from stda_hf import LABELS
from stda_hf.attribution.engine import check_composite_name, conservation, explain_batch, negative_fraction
from stda_hf.attribution.heatmaps import Tile, prediction_tiles, render_grid, save_grid
from stda_hf.attribution.relevance import localization, mean_or_none, summarize
from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.data.images import SkipReport, decode_image, fit_mask
from stda_hf.data.real import check_id

# ----------------------------------------------------------------------------------------------------------------
# Samples: rows the trainer (or a dataset split) holds


@dataclass
class Sample:
    """One image to explain, with what is known about it."""

    id: str
    image: Image.Image  # RGB at its own size
    label: str | None = None  # "benign" | "malignant"; None when unknown
    origin: str = "real"  # "real" | "synthetic" | "unknown"
    mask: np.ndarray | None = None  # binary lesion mask (H, W), None when unknown
    artifacts: np.ndarray | None = None  # artifact label map (H, W), None when unknown


def row_samples(rows, report: SkipReport | None = None) -> Iterator[Sample]:
    """Samples from rows of a packaged dataset (``image``, ``label``, ``origin``, ``isic_id``, ``mask``,
    ``artifact_mask``; every column but ``image`` optional).

    A row whose image or mask does not decode goes to ``report`` (or raises ``BadImageError`` without one).
    """
    for i, row in enumerate(_undecoded(rows)):
        where = f"row {i} ({row.get('isic_id') or 'no isic_id'})"
        try:
            image = decode_image(row["image"], where)
            mask, artifacts = (_decode_map(row.get(c), where) for c in ("mask", "artifact_mask"))
        except BadImageError as err:
            if report is None:
                raise
            report.add(err.path, err.reason)
            continue
        label = row.get("label")
        yield Sample(
            id=check_id(row.get("isic_id") or f"row_{i:06d}", where),
            image=image,
            label=LABELS[label] if isinstance(label, int) and 0 <= label < len(LABELS) else None,
            origin=row.get("origin") or "unknown",
            mask=mask,
            artifacts=artifacts,
        )


def _undecoded(ds):
    """``ds`` with its image columns left as bytes, so each row is decoded (and refused) one by one."""
    import datasets

    for column in ("image", "mask", "artifact_mask"):
        if isinstance(ds.features.get(column), datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _decode_map(value: dict | None, where: str) -> np.ndarray | None:
    return None if value is None else np.asarray(decode_image(value, where).convert("L"))


def fixed_samples(rows, n: int) -> list[Sample]:
    """The same ``n`` rows every time: the first of each class in turn (balanced), in dataset order."""
    labels = list(rows["label"]) if "label" in rows.column_names else [None] * len(rows)
    by_class: dict[object, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    queues = [by_class[k] for k in sorted(by_class, key=str)]
    picked: list[int] = []
    while len(picked) < min(n, len(labels)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return list(row_samples(rows.select(sorted(picked))))


# ----------------------------------------------------------------------------------------------------------------
# Explaining samples


@dataclass
class Result:
    """The explanation of one sample and its numbers."""

    sample: Sample
    input_image: Image.Image  # the image as the model saw it (resized)
    pixels: np.ndarray  # relevance per pixel (size, size)
    probs: np.ndarray  # class probabilities
    target: int  # class explained
    explained: float  # the explained score (log-odds or logit; 1 for gradient methods)
    conservation: float  # sum of relevance / explained score
    negative_fraction: float  # share of relevance mass that is negative
    numbers: dict[str, float]  # localization()

    @property
    def predicted(self) -> str:
        return _label_name(int(self.probs.argmax()))

    def record(self) -> dict:
        """One line of ``relevance.jsonl`` / ``relevance.csv`` (unknown values as None)."""
        record = {
            "id": self.sample.id,
            "label": self.sample.label,
            "origin": self.sample.origin,
            "predicted": self.predicted,
            "prob_malignant": float(self.probs[-1]),
            "target": _label_name(self.target),
            "explained": self.explained,
            "conservation": self.conservation,
            "negative_fraction": self.negative_fraction,
            **self.numbers,
        }
        return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in record.items()}


def _label_name(index: int) -> str:
    return LABELS[index] if index < len(LABELS) else str(index)


def target_indices(samples: list[Sample], target: str) -> torch.Tensor | None:
    """Class index per sample for ``target`` (``predicted`` -> None, ``true``, ``benign``, ``malignant``)."""
    if target == "predicted":
        return None
    if target in LABELS:
        return torch.full((len(samples),), LABELS.index(target), dtype=torch.long)
    missing = [s.id for s in samples if s.label is None]
    if missing:
        raise StdaError(
            f"--target true needs labels, but image {missing[0]} has none; use --target predicted, benign or "
            "malignant"
        )
    return torch.tensor([LABELS.index(s.label) for s in samples], dtype=torch.long)


def explain_samples(
    model: nn.Module,
    samples: list[Sample],
    transform: Callable[[Image.Image], torch.Tensor],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    method: str = "dtd",
    output: str = "log_odds",
    target: str = "predicted",
    resize: str = "squash",
) -> list[Result]:
    """Explain a batch of samples with ``model``; the input goes through ``transform`` (resize + normalise).

    Masks and artifact maps are brought to the relevance map's size in the geometry of ``transform``'s resize
    mode ``resize`` (:func:`~stda_hf.data.images.fit_mask`: nearest neighbour, crop or pad as the image was)
    before the numbers are computed, so they stay on the pixels the model saw.
    """
    if not samples:
        return []
    param = next(model.parameters())
    x = torch.stack([transform(s.image) for s in samples]).to(device=param.device, dtype=param.dtype)
    expl = explain_batch(model, x, target_indices(samples, target), method, mean, std, output)
    cons, neg = conservation(expl).cpu(), negative_fraction(expl).cpu()
    pixels, probs = expl.pixels.cpu().numpy(), expl.probs.cpu().numpy()
    results = []
    for i, s in enumerate(samples):
        size = pixels[i].shape[::-1]
        # Where the evidence for the explained score lies: with a fixed target (e.g. malignant) the score can be
        # negative, and then DTD's relevance is all negative; its sign is flipped so the shares still measure it.
        evidence = pixels[i] if float(expl.explained[i]) >= 0 else -pixels[i]
        numbers = localization(
            evidence, _resize_map(s.mask, size, resize), _resize_map(s.artifacts, size, resize)
        )
        results.append(
            Result(
                sample=s,
                input_image=_shown(x[i], mean, std),
                pixels=pixels[i],
                probs=probs[i],
                target=int(expl.target[i]),
                explained=float(expl.explained[i]),
                conservation=float(cons[i]),
                negative_fraction=float(neg[i]),
                numbers=numbers,
            )
        )
    return results


def _resize_map(arr: np.ndarray | None, size: tuple[int, int], resize: str = "squash") -> np.ndarray | None:
    """A mask or label map (uint8) at ``size`` ``(width, height)`` in the image's geometry."""
    if arr is None or arr.shape[::-1] == size:
        return arr
    return np.asarray(fit_mask(Image.fromarray(arr), size, resize))


def _shown(x: torch.Tensor, mean, std) -> Image.Image:
    """The normalised input ``(C, H, W)`` back as the RGB image the model saw."""
    m = torch.tensor(mean, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, device=x.device).view(-1, 1, 1)
    arr = ((x * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def result_tiles(result: Result, cmap: str = "bwr") -> list[Tile]:
    """The input and its overlay, captioned with true label, origin, prediction and relevance in the mask."""
    share = result.numbers.get("relevance_in_mask", float("nan"))
    note = "in mask: n/a" if np.isnan(share) else f"in mask: {share:.2f}"
    s = result.sample
    prob = float(result.probs.max())
    return prediction_tiles(
        result.input_image, result.pixels, result.predicted, prob, s.label, s.origin, note, cmap
    )


def results_grid(results: list[Result], columns: int = 4, title: str = "", cmap: str = "bwr") -> Image.Image:
    """A grid of ``columns`` images to a row, each as input + overlay (see :func:`result_tiles`)."""
    tiles = [tile for r in results for tile in result_tiles(r, cmap)]
    return render_grid(tiles, columns=2 * columns, title=title)


# ----------------------------------------------------------------------------------------------------------------
# In every training run: the on_evaluate hook


def explain_hook(
    n_images: int = 8, method: str = "dtd", columns: int = 4
) -> Callable[[Any], dict[str, float]]:
    """An ``on_evaluate`` hook for :func:`stda_hf.training.run_training`: explain the same images each time.

    At every evaluation it explains a fixed, class-balanced set of ``n_images`` images of the evaluated split
    (the first of each class in dataset order), saves the grid as ``<run>/heatmaps/<split>-epoch_NNNN.png``,
    sends it to the trackers that take images (TensorBoard, W&B), and returns the numbers to log:
    ``<method>_relevance_in_mask``, ``<method>_relevance_on_artifact``, ``<method>_conservation``, ...
    (unavailable numbers are left out). It runs on the main process only and leaves the model as it was.
    """
    check_composite_name(method)
    chosen: dict[str, list[Sample]] = {}

    def hook(ctx) -> dict[str, float]:
        if not ctx.accelerator.is_main_process:
            return {}
        if ctx.split not in chosen:
            chosen[ctx.split] = fixed_samples(ctx.dataset, n_images)
        pre = ctx.preprocessing
        results = explain_samples(
            ctx.model, chosen[ctx.split], ctx.transform, pre.mean, pre.std, method, resize=pre.resize
        )
        if not results:
            return {}
        grid = results_grid(results, columns, title=f"{method}, {ctx.split}, epoch {ctx.epoch}")
        save_grid(grid, Path(ctx.run_dir) / "heatmaps" / f"{ctx.split}-epoch_{ctx.epoch:04d}.png")
        log_grid(ctx.accelerator, f"{ctx.split}/heatmaps", grid, ctx.epoch)
        return hook_numbers(results, method)

    return hook


def hook_numbers(results: list[Result], method: str) -> dict[str, float]:
    """The numbers a training run logs for one explained set: localization averages and the DTD checks."""
    numbers = summarize([r.numbers for r in results])
    numbers["conservation"] = mean_or_none([r.conservation for r in results])
    numbers["negative_fraction"] = mean_or_none([r.negative_fraction for r in results])
    return {f"{method}_{k}": float(v) for k, v in numbers.items() if v is not None}


def log_grid(accelerator, name: str, grid: Image.Image, step: int) -> None:
    """Send ``grid`` to every tracker of ``accelerator`` that logs images (TensorBoard, W&B); others skip it."""
    array = np.asarray(grid)
    for tracker in getattr(accelerator, "trackers", []):
        if not hasattr(tracker, "log_images"):
            continue
        if getattr(tracker, "name", "") == "tensorboard":
            tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({name: [array]}, step=step)
