"""Explanations: Deep Taylor Decomposition (and baselines) through Zennit, and the numbers that judge them.

    stda explain --model runs/vgg8 --images real/ --split validation --out heatmaps/

The engine, pure tensor functions:

* :func:`make_composite` builds an attribution method by name. ``dtd`` is Deep Taylor Decomposition
  (Montavon et al. 2017): the z+ rule for every hidden convolution and linear layer, the bounded z^B rule
  (zennit's ``ZBox``) for the first layer with the box taken from the input normalisation
  (:func:`input_bounds`), and batch norm merged into the layer before it by zennit's
  ``SequentialMergeBatchNorm`` canonizer. Zennit's own composites (``epsilon_plus_flat``,
  ``epsilon_gamma_box``, ...) and the plain ``gradient`` serve as baselines.
* :func:`explain_batch` runs one of them on a batch; hooks, canonizers and the log-odds head are always
  removed afterwards, so the model computes exactly what it computed before.
* :func:`conservation` and :func:`negative_fraction` are the checks that hold for DTD: input relevance sums to
  the explained score (for bias-free layers; biases absorb the rest) and is non-negative.
* :func:`localization` and :func:`summarize` are the numbers: the share of positive relevance inside the
  lesion mask and on planted artifacts (unavailable where the mask is unknown; never invented). The
  ``relevance_localization`` ``evaluate`` measurement computes them with these same functions.

Around it: :func:`run_explain` (the ``stda explain`` stage: folder or dataset in, PNGs and numbers out,
resumable) and :func:`explain_hook` (``train.py`` explains a fixed set of validation images at every
evaluation and logs the grid and the numbers).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import COMPOSITES, SpecialFirstLayerMapComposite, layer_map_base
from zennit.core import Composite
from zennit.rules import ZBox, ZPlus
from zennit.types import Linear

from . import LABELS
from .config import config_to_dict
from .errors import BadImageError, StdaError
from .fileio import append_jsonl, read_jsonl, write_json, write_text
from .heatmaps import COLORMAPS, Tile, overlay, prediction_tiles, render_grid, save_grid, save_heatmap
from .images import IMAGE_EXTENSIONS, SkipReport, iter_images, load_image, save_image
from .models.vgg import IMAGENET_MEAN, IMAGENET_STD
from .phantoms import ARTIFACTS
from .real import RealFolder, RealImage, check_id, read_real_folder
from .training import eval_transform
from .utils import progress

logger = logging.getLogger(__name__)

GRADIENT_METHODS = ("gradient", "guided_backprop", "deconvnet", "beta_smooth")
"""Methods that modify or use the gradient itself: they explain a unit output, not the logit's value."""

COMPOSITE_NAMES = ("dtd", "gradient", *sorted(COMPOSITES))
"""Every attribution method :func:`make_composite` knows, ``dtd`` first."""


# ----------------------------------------------------------------------------------------------------------------
# Composites by name


def check_composite_name(name: str) -> str:
    """Return ``name`` when it is a known attribution method; otherwise raise listing the valid ones."""
    if name not in COMPOSITE_NAMES:
        raise StdaError(f"unknown attribution method {name!r}; valid methods: {', '.join(COMPOSITE_NAMES)}")
    return name


def input_bounds(
    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of possible network inputs, ``(low, high)`` of shape ``(1, C, 1, 1)``.

    Pixels in ``[0, 1]`` normalised by ``(x - mean) / std`` lie in ``[-mean / std, (1 - mean) / std]`` per
    channel; the z^B rule needs these bounds for the first layer.
    """
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise StdaError(f"input normalisation mean={mean} std={std}: need one positive std per mean")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t


def dtd_composite(low: torch.Tensor, high: torch.Tensor) -> Composite:
    """Deep Taylor Decomposition: z^B on the first linear layer, z+ on every other, batch norm merged."""
    return SpecialFirstLayerMapComposite(
        layer_map=[*layer_map_base(), (Linear, ZPlus())],
        first_map=[(Linear, ZBox(low=low, high=high))],
        canonizers=[SequentialMergeBatchNorm()],
    )


def make_composite(name: str, low: torch.Tensor, high: torch.Tensor) -> Composite | None:
    """The zennit composite called ``name`` (``None`` for the plain gradient), batch norm merged.

    Parameters
    ----------
    name : str
        One of :data:`COMPOSITE_NAMES`.
    low, high : torch.Tensor
        Input bounds from :func:`input_bounds`, used by the rules that need a box (``dtd``,
        ``epsilon_gamma_box``).

    Raises
    ------
    StdaError
        For an unknown name; the message lists the valid ones.
    """
    check_composite_name(name)
    if name == "gradient":
        return None
    if name == "dtd":
        return dtd_composite(low, high)
    cls = COMPOSITES[name]
    kwargs = {"low": low, "high": high} if name == "epsilon_gamma_box" else {}
    return cls(canonizers=[SequentialMergeBatchNorm()], **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Running an explanation


OUTPUTS = ("log_odds", "logit")
"""What is explained: ``log_odds`` (the target logit minus the mean of the other logits: for two classes the
log-odds of the target, positive for the predicted class) or ``logit`` (the raw target logit, as iNNvestigate's
DTD does; it can be negative, and then so is all DTD relevance)."""


@dataclass
class Explanation:
    """Relevance of a batch, and what was explained."""

    relevance: torch.Tensor  # (N, C, H, W) input relevance
    logits: torch.Tensor  # (N, K) model outputs
    target: torch.Tensor  # (N,) class index explained
    explained: torch.Tensor  # (N,) output relevance put in: the explained score, or 1 for gradient methods

    @property
    def pixels(self) -> torch.Tensor:
        """Relevance per pixel ``(N, H, W)``: the sum over colour channels."""
        return pixel_relevance(self.relevance)

    @property
    def probs(self) -> torch.Tensor:
        """Softmax class probabilities ``(N, K)``."""
        return self.logits.softmax(dim=1)


class _Logits(nn.Module):
    """The model as relevance needs it: logits as a tensor (transformers outputs carry ``.logits``), in full
    precision (the autocast wrapper that accelerate puts around ``forward`` for mixed precision keeps the
    original as ``_original_forward``; the layers, and so zennit's hooks on them, run either way)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.model, "_original_forward", self.model)(x)
        return out if isinstance(out, torch.Tensor) else out.logits


def explain_batch(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    method: str = "dtd",
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    output: str = "log_odds",
) -> Explanation:
    """Explain one output score of ``model`` per image of a batch of normalised images.

    The model is put in eval mode for the explanation and returned to its previous mode; zennit's hooks, the
    batch-norm merge and the log-odds head are removed even when the attribution fails, so the model computes
    exactly what it computed before. Parameter gradients are not touched.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``(N, K)`` (or an object with ``.logits``).
    x : torch.Tensor
        Normalised images ``(N, C, H, W)`` on the model's device.
    target : torch.Tensor, optional
        Class index per image; the predicted class when omitted.
    method : str
        One of :data:`COMPOSITE_NAMES`.
    mean, std : tuple of float
        The input normalisation, for the input bounds of the z^B rule.
    output : str
        One of :data:`OUTPUTS`: explain the target's log-odds (default) or its raw logit.

    Returns
    -------
    Explanation
        Relevance ``(N, C, H, W)`` whose sum approximates the explained score (relevance methods), logits,
        target and the explained score.

    Raises
    ------
    StdaError
        Unknown method or output, or (for ``log_odds``) no final linear layer with one output per class.
    """
    check_composite_name(method)
    if output not in OUTPUTS:
        raise StdaError(f"unknown output {output!r} to explain; valid: {', '.join(OUTPUTS)}")
    wrapped, was_training = _Logits(model), model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = wrapped(x)
        chosen = logits.argmax(dim=1) if target is None else target.to(logits.device)
        with _score_head(wrapped, logits, output) as scores:
            relevance = _attribute(wrapped, x, chosen, method, _bounds_on(x, mean, std), scores)
    finally:
        model.train(was_training)
    explained = scores.gather(1, chosen[:, None])[:, 0]
    if method in GRADIENT_METHODS:
        explained = torch.ones_like(explained)
    return Explanation(relevance, logits, chosen, explained)


def _bounds_on(x: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = input_bounds(mean, std)
    if low.shape[1] != x.shape[1]:
        raise StdaError(f"input normalisation has {low.shape[1]} channels, the images have {x.shape[1]}")
    return low.to(x), high.to(x)


def _attribute(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: str, bounds, scores: torch.Tensor
) -> torch.Tensor:
    """Input relevance of ``target`` under ``method``; the composite is removed whatever happens."""
    composite = make_composite(method, *bounds)
    onehot = torch.zeros_like(scores).scatter_(1, target[:, None], 1.0)
    attr_output = onehot if method in GRADIENT_METHODS else onehot * scores
    try:
        if composite is not None:
            composite.register(model)
        with torch.enable_grad():
            out, relevance = Gradient(model)(x.detach(), attr_output)
    finally:
        if composite is not None:
            composite.remove()
    _check_scores(out.detach(), scores)
    return relevance.detach()


def _check_scores(out: torch.Tensor, scores: torch.Tensor) -> None:
    """The hooked forward must compute the scores: otherwise the head found is not the output layer."""
    if not torch.allclose(out, scores, rtol=1e-3, atol=1e-4 * (1 + float(scores.abs().max()))):
        raise StdaError(
            "the model's last linear layer with one output per class is not its output layer, so its "
            "log-odds cannot be explained; explain the raw logit instead (output='logit', --output logit)"
        )


def contrast_matrix(n_classes: int) -> torch.Tensor:
    """``A`` with ``(A @ logits)[k] = logits[k] - mean(other logits)``: for two classes, the log-odds."""
    if n_classes < 2:
        return torch.ones(1, 1)
    a = torch.full((n_classes, n_classes), -1.0 / (n_classes - 1))
    return a.fill_diagonal_(1.0)


@contextlib.contextmanager
def _score_head(model: nn.Module, logits: torch.Tensor, output: str) -> Iterator[torch.Tensor]:
    """Temporarily fold :func:`contrast_matrix` into the final linear layer; yield the scores it computes."""
    if output == "logit":
        yield logits
        return
    head = _output_layer(model, logits.shape[1])
    a = contrast_matrix(logits.shape[1]).to(logits)
    weight, bias = head.weight.data, None if head.bias is None else head.bias.data
    head.weight.data = a @ weight
    if bias is not None:
        head.bias.data = a @ bias
    try:
        yield logits @ a.T
    finally:
        head.weight.data = weight
        if bias is not None:
            head.bias.data = bias


def _output_layer(model: nn.Module, n_classes: int) -> nn.Linear:
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n_classes]
    if not heads:
        raise StdaError(
            f"the model has no linear layer with {n_classes} outputs to explain log-odds with; "
            "explain the raw logit instead (output='logit', --output logit)"
        )
    return heads[-1]


# ----------------------------------------------------------------------------------------------------------------
# Checks that hold for DTD


def pixel_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """Sum relevance ``(N, C, H, W)`` over channels into one value per pixel ``(N, H, W)``."""
    return relevance.sum(dim=1)


def conservation(expl: Explanation) -> torch.Tensor:
    """Per image, the sum of input relevance over the explained output value (1 when fully conserved).

    For DTD on bias-free layers this is 1 up to the stabiliser; positive biases absorb relevance and lower it.
    """
    total = expl.relevance.flatten(1).sum(dim=1)
    return total / expl.explained.where(expl.explained.abs() > 1e-12, torch.full_like(expl.explained, 1e-12))


def negative_fraction(expl: Explanation) -> torch.Tensor:
    """Per image, the share of relevance mass that is negative (0 for DTD when the explained logit is positive)."""
    flat = expl.relevance.flatten(1)
    mass = flat.abs().sum(dim=1).clamp_min(1e-12)
    return flat.clamp(max=0).abs().sum(dim=1) / mass


# ----------------------------------------------------------------------------------------------------------------
# Numbers: where the relevance lies


def region_share(pixels: np.ndarray, region: np.ndarray | None) -> float:
    """Share of the positive relevance of one image that falls inside ``region``.

    Parameters
    ----------
    pixels : np.ndarray
        Relevance per pixel ``(H, W)``.
    region : np.ndarray or None
        Boolean (or 0/1, 0/255) mask ``(H, W)``; ``None`` when unknown.

    Returns
    -------
    float
        In ``[0, 1]``; ``NaN`` when the region is unknown or empty (nothing to measure) or the image has no
        positive relevance.
    """
    if region is None:
        return float("nan")
    region = _as_mask(region, pixels.shape)
    if not region.any():
        return float("nan")
    positive = np.clip(np.asarray(pixels, np.float64), 0.0, None)
    total = positive.sum()
    return float(positive[region].sum() / total) if total > 0 else float("nan")


def _as_mask(region: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    region = np.asarray(region)
    if region.shape != tuple(shape):
        raise StdaError(f"mask of shape {region.shape} does not match the relevance map {tuple(shape)}")
    return region > 0


def localization(
    pixels: np.ndarray, lesion_mask: np.ndarray | None, artifact_map: np.ndarray | None
) -> dict[str, float]:
    """Where the relevance of one image lies: in the lesion, on artifacts (all and per kind), and region areas.

    Parameters
    ----------
    pixels : np.ndarray
        Relevance per pixel ``(H, W)``.
    lesion_mask : np.ndarray or None
        Binary lesion mask ``(H, W)``, ``None`` when unknown.
    artifact_map : np.ndarray or None
        Artifact label map ``(H, W)`` (0 none, 1 ruler, 2 patch, 3 ink, 4 dark corners, see
        :data:`stda_hf.phantoms.ARTIFACTS`); ``None`` when unknown, all zero when known to have none.

    Returns
    -------
    dict
        ``relevance_in_mask``, ``mask_area`` (fraction of the image), ``relevance_on_artifact``,
        ``artifact_area`` and ``relevance_on_<kind>`` per artifact kind; a share is ``NaN`` where its region is
        unknown or absent from the image, an area is ``NaN`` where unknown. A relevance share well above its
        area means the model concentrates there.
    """
    out = {
        "relevance_in_mask": region_share(pixels, lesion_mask),
        "mask_area": _area(lesion_mask),
        "relevance_on_artifact": region_share(pixels, None if artifact_map is None else artifact_map > 0),
        "artifact_area": _area(None if artifact_map is None else artifact_map > 0),
    }
    for code, kind in enumerate(ARTIFACTS, start=1):
        region = None if artifact_map is None else artifact_map == code
        out[f"relevance_on_{kind}"] = region_share(pixels, region)
    return out


def _area(region: np.ndarray | None) -> float:
    return float("nan") if region is None else float((np.asarray(region) > 0).mean())


def summarize(rows: list[dict[str, float]]) -> dict[str, float | int | None]:
    """Average per-image :func:`localization` numbers into what the measurement and ``stda explain`` report.

    Each share is averaged over the images where it is defined (region known and present, some positive
    relevance), its area over the same images, and ``n_with_<region>`` says how many that is; a mean over no
    image is ``None`` (unavailable), never a guess.
    """
    out: dict[str, float | int | None] = {"n_images": len(rows)}
    pairs = [
        ("relevance_in_mask", "mask_area", "mask"),
        ("relevance_on_artifact", "artifact_area", "artifact"),
    ]
    pairs += [(f"relevance_on_{kind}", None, kind) for kind in ARTIFACTS]
    for share, area, name in pairs:
        keep = [r for r in rows if _defined(r.get(share))]
        out[share] = _mean([r[share] for r in keep])
        if area is not None:
            out[area] = _mean([r[area] for r in keep])
        out[f"n_with_{name}"] = len(keep)
    return out


def _defined(value: float | None) -> bool:
    return value is not None and not np.isnan(value)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


# ----------------------------------------------------------------------------------------------------------------
# Images to explain: from a folder, a dataset, or rows the trainer already holds


@dataclass
class Sample:
    """One image to explain, with what is known about it."""

    id: str
    image: Image.Image  # RGB at its own size
    label: str | None = None  # "benign" | "malignant"; None when unknown
    origin: str = "real"  # "real" | "synthetic" | "unknown"
    mask: np.ndarray | None = None  # binary lesion mask (H, W), None when unknown
    artifacts: np.ndarray | None = None  # artifact label map (H, W), None when unknown


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


def row_samples(rows, report: SkipReport | None = None) -> Iterator[Sample]:
    """Samples from rows of a packaged dataset (``image``, ``label``, ``origin``, ``isic_id``, ``mask``,
    ``artifact_mask``; every column but ``image`` optional).

    A row whose image or mask does not decode goes to ``report`` (or raises ``BadImageError`` without one).
    """
    from .training import decode_image

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
    from .training import decode_image

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
) -> list[Result]:
    """Explain a batch of samples with ``model``; the input goes through ``transform`` (resize + normalise).

    Masks and artifact maps are resized (nearest neighbour) to the relevance map's size before the numbers are
    computed.
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
        numbers = localization(pixels[i], _resize_map(s.mask, size), _resize_map(s.artifacts, size))
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


def _resize_map(arr: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    if arr is None or arr.shape[::-1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize(size, Image.NEAREST))


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

    def __post_init__(self) -> None:
        check_composite_name(self.method)
        _choice("output", self.output, OUTPUTS)
        _choice("target", self.target, ("predicted", "true", *LABELS))
        _choice("colormap", self.colormap, tuple(COLORMAPS))
        for name, low in (("limit", 0), ("batch_size", 1), ("grid", 0), ("columns", 1)):
            if getattr(self, name) < low:
                raise StdaError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least {low}")


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
    model, pre, device = _load_for_explain(model_dir, cfg.device)
    report = SkipReport()
    source, total = open_source(images, dataset, cfg.split, report)
    _prepare_out(out, _settings(model_dir, images, dataset, cfg), overwrite)
    if cfg.limit:
        source, total = itertools.islice(source, cfg.limit), min(total, cfg.limit)
    transform = eval_transform(pre)
    model = model.to(device)

    def explain(samples: list[Sample]) -> list[Result]:
        return explain_samples(
            model, samples, transform, pre.mean, pre.std, cfg.method, cfg.output, cfg.target
        )

    done = {r["id"] for r in read_jsonl(out / "relevance.jsonl")}
    n_new, shown = _explain_all(source, total, done, explain, out, cfg)
    return _finish(out, cfg, explain, shown, n_new, report)


def _load_for_explain(model_dir: str | Path, device: str):
    from .models.vgg import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise StdaError(f"--device {device!r}: not a device ({err}); use auto, cpu, cuda or cuda:N") from err
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise StdaError(f"--device {device}: CUDA is not available here; use --device cpu")
    model, pre = load_model(model_folder(model_dir))
    return model, pre, torch_device


def model_folder(path: str | Path) -> Path:
    """The folder holding the model: ``path`` itself, or the ``model/`` of a ``train.py`` run folder."""
    from .training import MODEL_DIR

    path = Path(path)
    if not (path / "config.json").is_file() and (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    return path


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
        raise StdaError(
            f"{out} holds explanations made with another model, source or settings (see {path}); pass "
            "--overwrite to replace them, or another --out"
        )
    if not path.is_file() and out.is_dir() and any(out.iterdir()) and not overwrite:
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
    records = read_jsonl(out / "relevance.jsonl")
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
    for key in ("conservation", "negative_fraction"):
        numbers[f"{key}_mean"] = _mean([r[key] for r in records if _defined(r.get(key))])
    labelled = [r for r in records if r.get("label") is not None]
    numbers["accuracy"] = _mean([float(r["predicted"] == r["label"]) for r in labelled])
    return numbers


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
)
"""Columns of ``relevance.csv``, in order."""


def _csv(records: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RECORD_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# In every training run: the on_evaluate hook of train.py


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
        results = explain_samples(ctx.model, chosen[ctx.split], ctx.transform, pre.mean, pre.std, method)
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
    numbers["conservation"] = _mean([r.conservation for r in results])
    numbers["negative_fraction"] = _mean([r.negative_fraction for r in results])
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
