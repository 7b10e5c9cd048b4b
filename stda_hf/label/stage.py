"""Pseudo-labels for synthetic images from a teacher trained on real images, optionally calibrated.

A benign lesion restyled with a malignant texture is not malignant by definition, so every synthetic image is
labelled by a teacher network and keeps its full class probabilities, confidence and entropy. Temperature
scaling on the real validation split (Guo et al., 2017) makes the confidences honest before a threshold is
applied; with a class-weighted teacher the logits are also shifted by about the log prior ratio, which a
temperature cannot remove, so calibration fits a bias as well (Platt scaling on the logit difference). Its
ECE is measured on validation images the fit did not see (two-fold cross-fitting), with a bootstrap interval
and beside what the binned estimator reads for a perfectly calibrated teacher at the same size.

Two guards keep calibration from doing harm on small or easy validation sets: with fewer than
``calibration_min_per_class`` images of a class it is not fitted, and when the teacher separates validation
perfectly or all but one image (the likelihood then grows without bound as the scale grows, so the fitted
scale says nothing) it is not applied. Either way the teacher's own probabilities label the images, one
warning line says why, and ``calibration.json`` records it. Pseudo-labels that calibration turns round are
counted. Labelling is resumable like ``generate``: ``labels.jsonl`` is append-only and re-running skips what is
done.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stda_hf import LABELS
from stda_hf.core.config import config_to_dict
from stda_hf.core.devices import resolve_device
from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.fileio import append_jsonl, atomic_write, write_json
from stda_hf.core.statefile import Fields, read_json, read_labels, read_manifest
from stda_hf.core.utils import progress, sha256_file, stable_hash
from stda_hf.data.images import SkipReport, check_resize, check_side, load_image
from stda_hf.data.real import read_real_folder

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.jsonl"
SUMMARY_FILE = "labels_summary.json"


@dataclass
class LabelConfig:
    """Settings of ``stda label``."""

    teacher: str = ""  # train.py run or model folder, a torchvision VGG name with --teacher-weights, or a transformers model
    teacher_weights: str = ""  # weights file for a torchvision teacher (e.g. vgg16 + vgg16-skin.safetensors)
    min_confidence: float = 0.0  # threshold the summary and card report (every label is kept)
    calibrate: bool = False  # fit a scale and bias (Platt) on the real validation split before labelling
    real: str = ""  # real-image folder for calibration and leakage checks (default: the one in source.json)
    image_size: int = 0  # teacher input side in pixels (0: the teacher's own)
    resize: str = ""  # teacher input geometry: crop, pad or squash (empty: the one the teacher was trained with; crop for a weights file)
    batch_size: int = 32  # images per forward pass
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    keep_failed: bool = False  # also label images that failed generate's quality gate (left out by default)
    calibration_min_per_class: int = (
        10  # fewer validation images of a class: no calibration (one warning line)
    )

    def __post_init__(self) -> None:
        if not self.teacher:
            raise StdaError("--teacher is required: a train.py run folder, a model folder or a model id")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise StdaError(f"--min-confidence {self.min_confidence} must be between 0 and 1 (e.g. 0.8)")
        if self.batch_size < 1:
            raise StdaError(f"--batch-size {self.batch_size} must be at least 1")
        if self.calibration_min_per_class < 2:
            raise StdaError(
                f"--calibration-min-per-class {self.calibration_min_per_class} must be at least 2 (the cross-fit "
                "holds one image of each class out of each half)"
            )
        if self.resize:  # empty: the teacher's own
            check_resize(self.resize)
        if self.image_size:  # 0: the teacher's own
            why = "each image of a batch becomes a float32 tensor of 3 x size x size"
            check_side("--image-size", self.image_size, 16, 4096, "teacher inputs", why, bytes_per_pixel=12)


# ----------------------------------------------------------------------------------------------------------------
# Pure functions: probabilities, calibration, summaries


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of ``probs`` ``(N, C)``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error: the bin-weighted gap between confidence and accuracy (equal-width bins).

    Parameters
    ----------
    probs : Tensor (N, C)
        Class probabilities.
    targets : Tensor (N,)
        True class ids.
    bins : int
        Number of confidence bins over [0, 1].
    """
    conf, pred = probs.max(-1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * (conf[inside].mean() - correct[inside].mean()).abs()
    return float(ece)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (temperature scaling)."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    logits, targets = logits.detach().float(), targets.long()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        raise StdaError(
            "temperature scaling diverged (are the validation labels all one class?); run without --calibrate"
        )
    return t


CALIBRATION_METHOD = "platt"
"""``calibration.json`` / ``labels_summary.json`` name of the calibration: a scale and a bias on the logit difference."""


def fit_platt(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> tuple[float, float]:
    """Scale ``a`` and bias ``b`` minimising the NLL of ``sigmoid(a (z_malignant - z_benign) + b)``.

    For two classes this is temperature scaling (``a = 1 / T``) plus a bias, which undoes the shift of the
    log-odds that a class-weighted loss leaves (about ``log`` of the prior ratio). ``a`` is kept positive (fitted
    as ``exp``): calibration may soften or sharpen the teacher, never turn its predictions round.
    """
    params = torch.tensor([0.0, 0.0], requires_grad=True)  # log a, b
    opt = torch.optim.LBFGS([params], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    margin, y = (logits[:, 1] - logits[:, 0]).detach().float(), targets.float()

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(params[0].exp() * margin + params[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = float(params.detach()[0].exp()), float(params.detach()[1])
    if not (math.isfinite(a) and math.isfinite(b)):
        raise StdaError(
            "calibration diverged (are the validation labels all one class?); run without --calibrate"
        )
    return a, b


def platt_probs(logits: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """Calibrated class probabilities ``(N, 2)`` from raw logits with a Platt scale and bias."""
    p = torch.sigmoid(scale * (logits[:, 1] - logits[:, 0]) + bias)
    return torch.stack([1 - p, p], dim=1)


def cross_fit_probs(logits: torch.Tensor, targets: torch.Tensor, seed: int = 0) -> torch.Tensor | None:
    """Platt-calibrated probabilities ``(N, 2)`` of each image from the fit on the other half of the images.

    The halves are stratified by class; None when a half would miss a class (nothing to fit or measure).
    """
    rng = np.random.default_rng(seed)
    half = np.zeros(len(targets), dtype=bool)
    for c in targets.unique().tolist():
        idx = rng.permutation(np.flatnonzero(targets.numpy() == c))
        half[idx[: len(idx) // 2]] = True
    masks = [torch.from_numpy(half), torch.from_numpy(~half)]
    if any(len(targets[m].unique()) < 2 for m in masks):
        return None
    probs = torch.empty(len(targets), 2)
    for fit, held in (masks, masks[::-1]):
        probs[held] = platt_probs(logits[held], *fit_platt(logits[fit], targets[fit]))
    return probs


def cross_fit_ece(logits: torch.Tensor, targets: torch.Tensor, seed: int = 0) -> float:
    """ECE of Platt scaling on images it was not fitted on (:func:`cross_fit_probs`); NaN when a half lacks a class."""
    probs = cross_fit_probs(logits, targets, seed)
    return float("nan") if probs is None else expected_calibration_error(probs, targets)


def _binned_ece(conf: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of ``conf``/``correct`` ``(B, N)`` with equal-width bins (as :func:`expected_calibration_error`)."""
    rows, n = conf.shape
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1) + bins * np.arange(rows)[:, None]
    gap = np.bincount(which.ravel(), (conf - correct).ravel(), minlength=rows * bins).reshape(rows, bins)
    return np.abs(gap).sum(1) / n


def ece_interval(
    probs: torch.Tensor, targets: torch.Tensor, bins: int = 15, draws: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """ECE with a 95 % bootstrap interval, and what the estimator reads for a perfectly calibrated model.

    The binned ECE is biased upwards on small sets: a model whose probabilities are exactly right still reads
    about 0.15 on 30 images. ``ece_if_calibrated`` is the mean ECE over label sets drawn from the model's own
    probabilities (a perfectly calibrated model with the same confidences), the level below which a measured
    ECE says nothing.

    Returns
    -------
    dict
        ``{"ece", "ece_ci": [low, high], "ece_if_calibrated", "bootstrap_draws"}``.
    """
    rng = np.random.default_rng(seed)
    p = probs.detach().double().numpy()
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == targets.numpy()).astype(float)
    n = len(conf)
    idx = rng.integers(0, n, (draws, n))
    boot = _binned_ece(conf[idx], correct[idx], bins)
    calibrated = (rng.random((draws, n)) < conf[None, :]).astype(float)
    return {
        "ece": round(expected_calibration_error(probs, targets, bins), 6),
        "ece_ci": [round(float(q), 6) for q in np.quantile(boot, [0.025, 0.975])],
        "ece_if_calibrated": round(
            float(_binned_ece(np.broadcast_to(conf, (draws, n)), calibrated, bins).mean()), 6
        ),
        "bootstrap_draws": draws,
    }


def misordered(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """The fewest images on the wrong side of any one threshold on the log-odds (0: perfectly separated).

    Platt scaling's likelihood grows without bound as the scale grows when this is 0, and is held by a single
    image when it is 1: the fitted scale then says how the set happened to fall, not how confident to be.
    """
    margin = (logits[:, 1] - logits[:, 0]).numpy()
    order = np.argsort(margin, kind="stable")
    y, m = targets.numpy()[order], margin[order]
    malignant_below = np.concatenate([[0], np.cumsum(y == 1)])  # cut after k images: those below are benign
    benign_above = (y == 0).sum() - np.concatenate([[0], np.cumsum(y == 0)])
    cuts = np.concatenate([[True], m[1:] > m[:-1], [True]])  # a threshold cannot split tied log-odds
    return int((malignant_below + benign_above)[cuts].min())


def label_record(
    image_id: str, probs: torch.Tensor, teacher: str, uncalibrated: torch.Tensor | None = None
) -> dict:
    """The ``labels.jsonl`` line of one image from its class probabilities.

    With ``uncalibrated`` (the teacher's own probabilities, when calibration was applied) the line also holds
    ``uncalibrated_label``, so a label that calibration turned round can be counted.
    """
    p = [round(float(x), 6) for x in probs]
    record = {
        "id": image_id,
        "label": LABELS[int(np.argmax(p))],
        "probs": p,
        "confidence": max(p),
        "entropy": round(float(entropy(probs[None]).item()), 6),
        "teacher": teacher,
    }
    if uncalibrated is not None:
        record["uncalibrated_label"] = LABELS[int(torch.argmax(uncalibrated))]
    return record


def flipped_labels(records: list[dict]) -> dict[str, int]:
    """``{"benign->malignant": n, "malignant->benign": m}``: labels calibration turned round (empty: none)."""
    flips = Counter(
        f"{r['uncalibrated_label']}->{r['label']}"
        for r in records
        if r.get("uncalibrated_label", r["label"]) != r["label"]
    )
    return dict(sorted(flips.items()))


def summarize(records: list[dict], manifest: dict[str, dict], min_confidence: float) -> dict:
    """Label counts overall, at the threshold, and per style and content source image."""
    by_style: dict[str, Counter] = defaultdict(Counter)
    by_content: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        src = manifest.get(r["id"], {})
        by_style[src.get("style_id", "?")][r["label"]] += 1
        by_content[src.get("content_id", "?")][r["label"]] += 1
    kept = [r for r in records if r["confidence"] >= min_confidence]
    conf = np.array([r["confidence"] for r in records]) if records else np.zeros(0)
    return {
        "images": len(records),
        "labels": dict(sorted(Counter(r["label"] for r in records).items())),
        "min_confidence": min_confidence,
        "kept": len(kept),
        "kept_labels": dict(sorted(Counter(r["label"] for r in kept).items())),
        "confidence_mean": round(float(conf.mean()), 4) if len(conf) else None,
        "confidence_quantiles": {
            q: round(float(np.quantile(conf, float(q))), 4) for q in ("0.1", "0.5", "0.9")
        }
        if len(conf)
        else {},
        "by_style": {k: dict(sorted(v.items())) for k, v in sorted(by_style.items())},
        "by_content": {k: dict(sorted(v.items())) for k, v in sorted(by_content.items())},
        "flipped_by_calibration": flipped_labels(records),
    }


@dataclass
class LabelSummary:
    """What ``stda label`` wrote: the counts of :func:`summarize` and the teacher (``labels_summary.json``)."""

    images: int  # synthetic images with a label
    labels: dict[str, int]  # images per label
    min_confidence: float  # the threshold a synthetic image needs to be used in training
    kept: int  # images at or above the threshold
    kept_labels: dict[str, int]  # those, per label
    confidence_mean: float | None  # mean confidence (None: no image)
    confidence_quantiles: dict[str, float]  # 0.1, 0.5 and 0.9 quantiles of the confidence
    by_style: dict[str, dict[str, int]]  # labels per style source image
    by_content: dict[str, dict[str, int]]  # labels per content source image
    teacher: str  # the teacher's id, as labels.jsonl records it
    temperature: float  # 1 / the Platt scale (1: uncalibrated)
    calibration: dict[str, Any] | None  # Platt scaling on the real validation split, when asked for
    calibration_method: str  # "none", or "platt" (a scale and a bias on the logit difference)
    skipped: dict[str, str]  # unreadable images and why
    settings: dict[str, Any]  # the LabelConfig used
    teacher_input: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # the teacher's input as used: image_size and resize mode (crop, pad or squash)
    left_out_failed: dict[str, int] = dataclasses.field(default_factory=dict)  # verdict -> not labelled
    flipped_by_calibration: dict[str, int] = dataclasses.field(
        default_factory=dict
    )  # "benign->malignant" -> labels calibration turned round

    def to_json(self) -> dict[str, Any]:
        """The summary as ``labels_summary.json`` holds it."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# The teacher


@dataclass
class Teacher:
    """A classifier with two outputs (benign, malignant) and the preprocessing it expects."""

    model: nn.Module
    preprocessing: Any  # models.vgg.Preprocessing: input size, mean and std
    name: str  # recorded in labels.jsonl and the dataset card
    folder: Path | None = None  # the model or run folder, when there is one

    def __post_init__(self) -> None:
        from stda_hf.models.vgg import eval_transform

        self._transform = eval_transform(self.preprocessing)

    def preprocess(self, images: list) -> torch.Tensor:
        """PIL images -> normalised batch ``(N, 3, S, S)``, exactly as train.py evaluates."""
        return torch.stack([self._transform(im) for im in images])

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Raw logits ``(N, 2)`` on the CPU."""
        from stda_hf.models.vgg import logits_of

        return logits_of(self.model(batch.to(device))).float().cpu()


def load_teacher(cfg: LabelConfig) -> Teacher:
    """Resolve ``cfg.teacher``: a train.py run folder (``model/`` inside), a saved model folder, a torchvision
    VGG name with ``cfg.teacher_weights``, or a ``transformers`` model id or folder.

    Raises
    ------
    StdaError
        Missing teacher, a teacher without exactly the two classes benign and malignant, or unreadable weights.
    """
    from stda_hf.models.vgg import MODEL_NAMES, Preprocessing, build_model, load_model, model_folder

    spec = cfg.teacher
    folder = model_folder(spec)
    if (folder / "config.json").is_file():
        model, pre = load_model(folder)
        name = f"{folder.parent.name if folder.name == 'model' else folder.name}@{_weights_digest(folder)}"
    elif spec in MODEL_NAMES:
        if not cfg.teacher_weights:
            raise StdaError(
                f"teacher {spec!r} needs --teacher-weights FILE (a fine-tuned 2-class state dict)"
            )
        model, pre = (
            build_model(spec, weights=cfg.teacher_weights).eval(),
            Preprocessing(cfg.image_size or 224),
        )
        name = f"{spec}:{Path(cfg.teacher_weights).name}"
    elif folder.exists() or spec.startswith((".", "/")):
        raise StdaError(
            f"teacher {spec!r}: no config.json in it; give a train.py run folder or a saved model folder"
        )
    else:
        model, pre = load_model_from_hub(spec)
        name = spec
    _check_two_classes(model, spec)
    if cfg.image_size:
        pre = dataclasses.replace(pre, image_size=cfg.image_size)
    if cfg.resize:
        pre = dataclasses.replace(pre, resize=cfg.resize)
    return Teacher(model.eval(), pre, name, folder if folder.is_dir() else None)


def load_model_from_hub(model_id: str):
    """A ``transformers`` image classifier by Hub id (downloads when online) with its preprocessing."""
    from stda_hf.models.vgg import build_model, default_preprocessing

    model = build_model(model_id, weights="auto")
    return model, default_preprocessing(model_id, 224)


def _weights_digest(folder: Path) -> str:
    """A short digest of a model folder's weight files: which weights labelled an image."""
    return stable_hash([sha256_file(f) for f in sorted(folder.glob("*.safetensors"))], length=12)


def _check_two_classes(model: nn.Module, spec: str) -> None:
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if id2label:
        names = [str(id2label[i]).lower() for i in sorted(id2label)]
        if names != list(LABELS):
            raise StdaError(
                f"teacher {spec!r} predicts {names}; a teacher must predict exactly {list(LABELS)}"
            )
        return
    with torch.inference_mode():
        out = model.eval()(torch.zeros(1, 3, 32, 32))
    from stda_hf.models.vgg import logits_of

    n = logits_of(out).shape[-1]
    if n != len(LABELS):
        raise StdaError(f"teacher {spec!r} has {n} outputs; a teacher must predict exactly {list(LABELS)}")


def check_teacher_data(teacher: Teacher, real_root: Path) -> None:
    """Refuse a teacher whose recorded training data includes validation or test images of ``real_root``.

    A train.py run records the dataset it trained on (``config.yaml``) and the ids of its training rows
    (``train_ids.txt``) when known; both are checked. Unknown provenance is logged, not refused.
    """
    from stda_hf.models.vgg import run_folder

    run = run_folder(teacher.folder) if teacher.folder is not None else None
    ids_file = run / "train_ids.txt" if run is not None else None
    if ids_file is None or not ids_file.is_file():
        logger.warning(
            "teacher %s does not record its training ids; cannot check it for leakage", teacher.name
        )
        return
    trained = set(ids_file.read_text(encoding="utf-8").split())
    assignment = read_real_folder(real_root).splits()
    leaked = sorted(i for i in trained if assignment.get(i) in ("validation", "test"))
    if leaked:
        raise StdaError(
            f"teacher {teacher.name} was trained on {len(leaked)} validation/test image(s) of {real_root} "
            f"(e.g. {leaked[:3]}); train the teacher on the real train split only"
        )


# ----------------------------------------------------------------------------------------------------------------
# The stage


def _real_root(synthetic: Path, cfg: LabelConfig) -> Path | None:
    if cfg.real:
        return Path(cfg.real)
    recover = "pass the real-image folder with --real, or re-run `stda generate`, which writes it again"
    source = read_json(
        synthetic / "source.json", Fields(required={"real": str}), recover=recover, default=None
    )
    return None if source is None else Path(source["real"])


def calibrate(
    teacher: Teacher, real_root: Path, device: torch.device, batch_size: int, min_per_class: int = 10
) -> dict:
    """Fit a Platt scale and bias on the real validation split, measure it honestly, or say why not.

    Returns ``calibration.json``'s content: ``method`` (``platt``, or ``none`` after a fallback, with
    ``fallback`` = ``too_few`` or ``separation`` and a one-line ``reason``), ``scale``, ``bias``,
    ``temperature`` (1/scale; after a fallback 1, 0 and 1), ``ece_before`` and ``ece_after`` with their
    95 % bootstrap intervals and ``ece_if_calibrated`` references, ``ece_after_on`` (where it was measured),
    ``misordered`` and ``validation_images`` / ``per_class``. The parameters used for labelling are fitted on
    the whole validation split; ``ece_after`` is cross-fitted (:func:`cross_fit_probs`: fitted on one half,
    measured on the other), never the fit's own images.
    """
    z, y = _validation_logits(teacher, real_root, device, batch_size)
    return calibration_from_logits(z, y, min_per_class)


def calibration_from_logits(z: torch.Tensor, y: torch.Tensor, min_per_class: int = 10) -> dict[str, Any]:
    """:func:`calibrate` on the teacher's validation logits ``z`` ``(N, 2)`` and labels ``y`` ``(N,)``."""
    per_class = {label: int((y == i).sum()) for i, label in enumerate(LABELS)}
    before = ece_interval(z.softmax(-1), y)
    result: dict[str, Any] = {
        "ece_before": before["ece"],
        "ece_before_ci": before["ece_ci"],
        "ece_before_if_calibrated": before["ece_if_calibrated"],
        "validation_images": len(y),
        "per_class": per_class,
        "min_per_class": min_per_class,
    }
    if min(per_class.values()) < min_per_class:
        counts = ", ".join(f"{n} {label}" for label, n in per_class.items())
        reason = (
            f"validation holds {counts}; calibration needs {min_per_class} of each class "
            "(--calibration-min-per-class)"
        )
        return {**result, **_fallback("too_few", reason, before)}
    wrong = misordered(z, y)
    result["misordered"] = wrong
    try:
        a, b = fit_platt(z, y)
    except StdaError:
        a, b = float("inf"), float("nan")
    if wrong <= 1 or not math.isfinite(a):
        fitted = {
            "fitted_scale": round(a, 6) if math.isfinite(a) else None,
            "fitted_bias": round(b, 6) if math.isfinite(b) else None,
        }
        how = "perfectly" if wrong == 0 else "but for one image" if wrong == 1 else f"but for {wrong} images"
        reason = (
            f"the teacher separates validation {how} (fitted scale {a:.3g}): the fit would push every "
            "confidence towards 1"
        )
        return {**result, **fitted, **_fallback("separation", reason, before)}
    held = cross_fit_probs(z, y)
    after = ece_interval(held, y) if held is not None else ece_interval(platt_probs(z, a, b), y)
    return {
        **result,
        "method": CALIBRATION_METHOD,
        "scale": round(a, 6),
        "bias": round(b, 6),
        "temperature": round(1.0 / a, 6) if a != 0 else None,
        "ece_after": after["ece"],
        "ece_after_ci": after["ece_ci"],
        "ece_after_if_calibrated": after["ece_if_calibrated"],
        "ece_after_on": "held-out halves of the validation split (cross-fit)"
        if held is not None
        else "the fitting images themselves (too few of a class to hold any out): optimistic",
    }


def _fallback(kind: str, reason: str, before: dict[str, Any]) -> dict[str, Any]:
    """The ``calibration.json`` fields of a calibration that was asked for and not applied, and its warning."""
    logger.warning("not calibrating: %s; labelling with the teacher's own probabilities", reason)
    return {
        "method": "none",
        "fallback": kind,
        "reason": reason,
        "scale": 1.0,
        "bias": 0.0,
        "temperature": 1.0,
        "ece_after": before["ece"],
        "ece_after_ci": before["ece_ci"],
        "ece_after_if_calibrated": before["ece_if_calibrated"],
        "ece_after_on": "the whole validation split, uncalibrated (nothing was fitted)",
    }


def _validation_logits(
    teacher: Teacher, real_root: Path, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits ``(N, 2)`` and the labels ``(N,)`` of the real validation split's loadable images."""
    folder = read_real_folder(real_root)
    images = folder.subset("validation")
    if not images:
        raise StdaError(f"{real_root} has no validation images to calibrate on; run `stda split` first")
    report, logits, targets = SkipReport(), [], []
    for start in progress(range(0, len(images), batch_size), desc="calibrate", unit="batch"):
        batch, labels = [], []
        for im in images[start : start + batch_size]:
            try:
                batch.append(load_image(im.path))
                labels.append(LABELS.index(im.label))
            except BadImageError as err:
                report.add(err.path, err.reason)
        if batch:
            logits.append(teacher.logits(teacher.preprocess(batch), device))
            targets += labels
    if not targets:
        raise StdaError(f"no validation image of {real_root} could be read; see the skipped files above")
    return torch.cat(logits), torch.tensor(targets)


def calibration_applied(calibration: dict | None) -> bool:
    """Whether a ``calibration.json`` content changes the probabilities (Platt fitted and not fallen back)."""
    return bool(calibration) and calibration.get("method") == CALIBRATION_METHOD


def label_synthetic(synthetic: str | Path, cfg: LabelConfig) -> LabelSummary:
    """Label every image of a synthetic folder's ``manifest.jsonl``; resumable; returns the summary.

    Writes ``labels.jsonl`` (one line per image, appended as batches finish), ``labels_summary.json``,
    ``calibration.json`` (with ``calibrate``) and ``confidence_histogram.png``.

    Raises
    ------
    StdaError
        No manifest, a teacher that cannot be used, or labels already written by another teacher or
        temperature (delete ``labels.jsonl`` to relabel).
    """
    synthetic = Path(synthetic)
    manifest_records = read_manifest(synthetic / "manifest.jsonl")
    if not manifest_records:
        raise StdaError(f"{synthetic}/manifest.jsonl is missing or empty; run `stda generate` first")
    manifest, left_out = passed_gate(manifest_records, cfg.keep_failed)
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg)
    teacher.model.to(device)
    real_root = _real_root(synthetic, cfg)
    if real_root is not None:
        check_teacher_data(teacher, real_root)
    calibration = _calibration(synthetic, teacher, cfg, real_root, device)
    applied = calibration_applied(calibration)
    scale, bias = calibration.get("scale", 1.0), calibration.get("bias", 0.0)
    temperature = calibration.get("temperature") or 1.0
    tag = f"{teacher.name}|platt={scale:g},{bias:g}" if applied else f"{teacher.name}|T=1"
    done = _done_labels(synthetic, tag)
    todo = [i for i in sorted(manifest) if i not in done]
    report = SkipReport()
    bar = progress(total=len(todo), desc="label", unit="img")
    for start in range(0, len(todo), cfg.batch_size):
        ids, batch = [], []
        for image_id in todo[start : start + cfg.batch_size]:
            try:
                batch.append(load_image(synthetic / manifest[image_id]["file"]))
                ids.append(image_id)
            except BadImageError as err:
                report.add(err.path, err.reason)
        if batch:
            logits = teacher.logits(teacher.preprocess(batch), device)
            probs = platt_probs(logits, scale, bias) if applied else logits.softmax(-1)
            raw = logits.softmax(-1) if applied else [None] * len(ids)
            for image_id, p, r in zip(ids, probs, raw, strict=True):
                append_jsonl(synthetic / LABELS_FILE, label_record(image_id, p, tag, uncalibrated=r))
        bar.update(len(todo[start : start + cfg.batch_size]))
    bar.close()
    records = [r for r in read_labels(synthetic / LABELS_FILE) if r["id"] in manifest]
    summary = LabelSummary(
        **summarize(records, manifest, cfg.min_confidence),
        teacher=teacher.name,
        temperature=temperature,
        calibration=calibration or None,
        calibration_method=CALIBRATION_METHOD if applied else "none",
        skipped=report.skipped,
        settings=config_to_dict(cfg),
        teacher_input={
            "image_size": teacher.preprocessing.image_size,
            "resize": teacher.preprocessing.resize,
        },
        left_out_failed=left_out,
    )
    write_json(synthetic / SUMMARY_FILE, summary.to_json())
    plot_confidence(records, cfg.min_confidence, synthetic / "confidence_histogram.png")
    if summary.flipped_by_calibration:
        logger.info(
            "calibration turned %d pseudo-label(s) round (%s)",
            sum(summary.flipped_by_calibration.values()),
            ", ".join(f"{k} {v}" for k, v in summary.flipped_by_calibration.items()),
        )
    if report:
        logger.warning("%s", report.summary())
    return summary


def passed_gate(records: list[dict], keep_failed: bool) -> tuple[dict[str, dict], dict[str, int]]:
    """``{id: record}`` of the manifest lines to label, and ``{verdict: count}`` of those left out.

    Images whose quality verdict is not ``ok`` (``unchanged``, ``content_lost``) are left out unless
    ``keep_failed``; lines written before the gate existed count as ``ok``.
    """
    verdicts = {r["id"]: (r.get("quality") or {}).get("verdict", "ok") for r in records}
    left_out = Counter(v for v in verdicts.values() if v != "ok" and not keep_failed)
    if left_out:
        logger.info(
            "left out %d image(s) that failed the quality gate (%s); --keep-failed labels them",
            sum(left_out.values()),
            ", ".join(f"{v} {n}" for v, n in sorted(left_out.items())),
        )
    kept = {r["id"]: r for r in records if keep_failed or verdicts[r["id"]] == "ok"}
    return kept, dict(sorted(left_out.items()))


def _calibration(synthetic: Path, teacher: Teacher, cfg: LabelConfig, real_root: Path | None, device) -> dict:
    """Reuse a saved calibration of the same teacher (so a resumed run uses the same temperature)."""
    if not cfg.calibrate:
        return {}
    path = synthetic / "calibration.json"
    key = stable_hash(
        {
            "teacher": teacher.name,
            "real": str(real_root),
            "method": CALIBRATION_METHOD,
            "min_per_class": cfg.calibration_min_per_class,
        }
    )
    recover = "delete it: the next `stda label --calibrate` calibrates again"
    saved = read_json(path, CALIBRATION_FIELDS, recover=recover, default=None)
    if saved is not None and saved.get("key") == key:
        return saved
    if real_root is None:
        raise StdaError(
            "--calibrate needs the real-image folder: pass --real or keep source.json in the synthetic folder"
        )
    result = {
        **calibrate(teacher, real_root, device, cfg.batch_size, cfg.calibration_min_per_class),
        "key": key,
    }
    write_json(path, result)
    if calibration_applied(result):
        logger.info(
            "Platt scale %.3f, bias %.3f: ECE %.4f [%.4f, %.4f] -> %.4f [%.4f, %.4f] (after: on %s)",
            result["scale"],
            result["bias"],
            result["ece_before"],
            *result["ece_before_ci"],
            result["ece_after"],
            *result["ece_after_ci"],
            result["ece_after_on"],
        )
    return result


CALIBRATION_FIELDS = Fields(
    required={"key": str, "scale": float, "bias": float}, optional={"temperature": (float, type(None))}
)
"""The schema of ``calibration.json``."""


def _done_labels(synthetic: Path, tag: str) -> set[str]:
    records = read_labels(synthetic / LABELS_FILE)
    others = {r["teacher"] for r in records} - {tag}
    if others:
        raise StdaError(
            f"{synthetic / LABELS_FILE} holds labels from {sorted(others)}, not {tag}; delete it to relabel "
            "with this teacher"
        )
    return {r["id"] for r in records}


def plot_confidence(records: list[dict], threshold: float, path: Path) -> None:
    """Histogram of teacher confidence per predicted label, with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    bins = np.linspace(0.5, 1.0, 26)
    for label in LABELS:
        values = [r["confidence"] for r in records if r["label"] == label]
        ax.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})")
    if threshold > 0:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("teacher confidence")
    ax.set_ylabel("synthetic images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
