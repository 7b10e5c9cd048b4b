"""Training of benign/malignant classifiers under Accelerate: data pipeline, epochs, evaluation, checkpoints, resume.

``train.py`` is the command; this module is the machinery, importable on its own:

* data: :func:`load_splits` loads a Hub dataset (id or local ``stda package`` folder), checks its columns and
  that validation/test hold real images only, skips undecodable images; :func:`build_transforms`,
  :class:`EpochSampler` (synthetic mixing, balanced sampling, order drawn from seed and epoch alone);
* steps: :func:`train_one_epoch` and :func:`evaluate` (metrics through the project's ``evaluate`` module on
  predictions gathered from every process);
* run: :func:`run_training` with ``save_state`` checkpoints each epoch and at the best validation score, exact
  resume, early stopping, a JSON-lines log (TensorBoard too when installed), the final model, plots and card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.tracking import GeneralTracker
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from . import LABELS, SPLITS
from .config import changed_settings, config_to_dict, describe_changes, dump_config, read_settings
from .errors import BadImageError, StdaError
from .fileio import append_jsonl, read_jsonl, write_json, write_text
from .images import SkipReport, decode_image
from .models.vgg import (
    MODEL_DIR,
    MODEL_NAMES,
    Preprocessing,
    build_model,
    default_preprocessing,
    describe_weights,
    eval_transform,
    layer_list,
    logits_of,
    save_model,
)
from .utils import progress, seed_everything

logger = logging.getLogger(__name__)

SYNTHETIC_MODES = ("none", "mix", "pretrain")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
IMBALANCE = ("weights", "sampler", "none")
PRECISIONS = ("no", "fp16", "bf16")
MONITORS = (
    "roc_auc",
    "balanced_accuracy",
    "accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "precision",
    "loss",
)
REQUIRED_COLUMNS = ("image", "label")
RUN_CONTROL = (
    "resume",
    "overwrite",
    "stop_after_epoch",
    "epochs",
    "num_workers",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
    "explain_images",
    "explain_method",
)
"""Settings that may change when a run is resumed (none changes the weights); any other is refused."""
"""Sub-folder of a run with the final model, its card and plots: exactly what ``--push-to-hub`` uploads."""


@dataclass
class TrainConfig:
    """Settings of one training run (``train.py`` flags, or a ``--config`` YAML with the same keys)."""

    dataset: str = "stda/skin-lesions"  # Hub dataset id, or a local folder written by `stda package`
    dataset_config: str | None = None  # dataset configuration name (default: the dataset's default)
    revision: str | None = None  # dataset revision on the Hub (branch, tag or commit)
    synthetic: str = "none"  # none | mix (synthetic images added to each epoch) | pretrain (synthetic first)
    synthetic_ratio: float = 1.0  # mix: synthetic images drawn per real training image, anew each epoch
    min_confidence: float = 0.0  # use only synthetic images whose pseudo-label confidence is at least this
    pretrain_epochs: int = 5  # pretrain: epochs on synthetic images before the real-image epochs
    image_size: int = 224  # images are resized to this square side (pixels)
    check_images: bool = True  # decode every image once before training; skip and report bad ones
    model: str = "vgg8"  # vgg8 | vgg11 | vgg11_bn | vgg16 | vgg16_bn | transformers model id or folder
    weights: str = "auto"  # auto (vgg8 random, torchvision imagenet) | imagenet | random | weights file
    vgg8_widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # VGG8: channels of the five convolutions
    vgg8_hidden: tuple[int, ...] = (512, 512)  # VGG8: units of the first two fully connected layers
    batch_norm: bool = True  # VGG8: batch normalisation after each convolution
    dropout: float = 0.5  # dropout of the fully connected layers (VGG8 and torchvision VGGs)
    augment: bool = True  # classic augmentation of training images (rotation .. color_jitter)
    rotation: float = 20.0  # augmentation: largest rotation, degrees
    zoom: float = 0.1  # augmentation: largest zoom in or out (0.1: scale 0.9 to 1.1)
    shear: float = 5.0  # augmentation: largest shear, degrees
    hflip: bool = True  # augmentation: random horizontal flips
    vflip: bool = True  # augmentation: random vertical flips (lesions have no up)
    color_jitter: float = 0.1  # augmentation: brightness, contrast, saturation jitter (hue a quarter)
    epochs: int = 30  # epochs on real training images (after the pretrain epochs, if any)
    batch_size: int = 32  # images per process and step
    grad_accum: int = 1  # gradient accumulation steps (effective batch: batch_size x processes x this)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # weight decay
    schedule: str = "cosine"  # cosine | step | constant, per epoch; restarts at fine-tuning in pretrain mode
    warmup_epochs: int = 0  # linear warm-up epochs at the start of each phase
    step_size: int = 10  # step schedule: epochs between decays
    gamma: float = 0.1  # step schedule: decay factor
    imbalance: str = "weights"  # weights (class-weighted loss) | sampler (balanced sampling) | none
    mixed_precision: str = "no"  # no | fp16 (GPU only) | bf16
    early_stopping: int = 10  # stop after this many epochs without validation improvement (0: never)
    monitor: str = "roc_auc"  # validation metric that picks the best checkpoint (loss: lower is better)
    seed: int = 0  # seed of weights, data order and augmentation
    num_workers: int = 2  # data-loading worker processes per training process
    output_dir: str = "runs/vgg8"  # run folder: checkpoints, metrics, log, final model, model card
    resume: bool = False  # continue the run in output_dir from its last checkpoint (fresh start if none)
    overwrite: bool = False  # delete the run already in output_dir and start again
    keep_checkpoints: int = 2  # epoch checkpoints kept (the best one is kept apart)
    stop_after_epoch: int = 0  # stop as if killed after this epoch's checkpoint (0: never; to test resume)
    push_to_hub: bool = False  # upload the final model, card and plots to the Hub
    hub_model_id: str | None = None  # Hub model repo for --push-to-hub, e.g. me/vgg8-stda
    hub_private: bool = False  # create the Hub repo as private
    explain_images: int = (
        8  # validation/test images explained at each evaluation (heatmaps/, logged numbers; 0: off)
    )
    explain_method: str = (
        "dtd"  # attribution method of those explanations (dtd, gradient, or a zennit composite)
    )


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, naming the bad value and the valid ones.

    Raises
    ------
    StdaError
        On the first bad setting.
    """
    for name, valid in (
        ("synthetic", SYNTHETIC_MODES),
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("imbalance", IMBALANCE),
        ("mixed_precision", PRECISIONS),
        ("monitor", MONITORS),
    ):
        if getattr(cfg, name) not in valid:
            raise StdaError(
                f"--{_flag(name)} {getattr(cfg, name)!r} is not valid; choose one of {list(valid)}"
            )
    _check_ranges(cfg)
    if cfg.explain_images:
        from .attribution import check_composite_name

        check_composite_name(cfg.explain_method)
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise StdaError("--push-to-hub needs --hub-model-id (e.g. your-name/vgg8-stda)")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise StdaError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")


def _check_ranges(cfg: TrainConfig) -> None:
    positive = ("epochs", "batch_size", "grad_accum", "image_size", "keep_checkpoints", "step_size")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise StdaError(f"--{_flag(name)} must be at least 1; got {getattr(cfg, name)}")
    for name in (
        "pretrain_epochs", "warmup_epochs", "early_stopping", "num_workers", "stop_after_epoch", "explain_images"
    ):  # fmt: skip
        if getattr(cfg, name) < 0:
            raise StdaError(f"--{_flag(name)} must not be negative; got {getattr(cfg, name)}")
    checks = (
        ("lr", cfg.lr > 0, "a positive number"),
        ("synthetic_ratio", cfg.synthetic_ratio >= 0, "0 or more"),
        ("min_confidence", 0.0 <= cfg.min_confidence <= 1.0, "between 0 and 1"),
        ("gamma", 0.0 < cfg.gamma <= 1.0, "in (0, 1]"),
        ("zoom", 0.0 <= cfg.zoom < 1.0, "in [0, 1)"),
        ("color_jitter", cfg.color_jitter >= 0, "0 or more"),
    )
    for name, ok, what in checks:
        if not ok:
            raise StdaError(f"--{_flag(name)} must be {what}; got {getattr(cfg, name)}")
    if cfg.synthetic == "pretrain" and cfg.pretrain_epochs < 1:
        raise StdaError("--synthetic pretrain needs --pretrain-epochs of at least 1")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Splits:
    """The splits a run uses: real train, validation and test, and the (filtered) synthetic images."""

    train: Any  # datasets.Dataset of real training images
    validation: Any  # real images only
    test: Any | None  # real images only; None when the dataset has no test split
    synthetic: Any | None  # pseudo-labelled synthetic images; None unless --synthetic mix|pretrain
    skipped: SkipReport = field(default_factory=SkipReport)  # undecodable images left out

    def sizes(self) -> dict[str, int]:
        """Rows per split used (absent splits left out)."""
        names = (*SPLITS, "synthetic")
        return {n: len(getattr(self, n)) for n in names if getattr(self, n) is not None}


def load_splits(cfg: TrainConfig) -> Splits:
    """Load the dataset of ``cfg`` and return the splits a run needs, checked.

    Raises
    ------
    StdaError
        Dataset not found (or offline), a split without ``image``/``label`` (the columns found are named),
        labels other than benign/malignant, synthetic rows in train/validation/test, a missing split.
    """
    data = _load_dataset(cfg.dataset, cfg.dataset_config, cfg.revision)
    for name in SPLITS[:2]:  # train and validation are required
        if name not in data:
            raise StdaError(f"dataset {cfg.dataset} has no {name!r} split; splits found: {sorted(data)}")
    for name, ds in data.items():
        _check_columns(ds, name, cfg.dataset)
    _check_both_classes(data["train"], cfg.dataset)
    splits = Splits(
        train=_real_only(data["train"], "train"),
        validation=_real_only(data["validation"], "validation"),
        test=_real_only(data["test"], "test") if "test" in data else None,
        synthetic=_synthetic(data, cfg),
    )
    if splits.test is None:
        logger.warning("dataset %s has no 'test' split: the run ends without test metrics", cfg.dataset)
    if cfg.check_images:
        _drop_bad_images(splits)
    return splits


def _load_dataset(name: str, config: str | None, revision: str | None):
    import datasets

    path = Path(name)
    local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1
    if local and not path.is_dir():
        raise StdaError(
            f"dataset folder {name} not found; give a folder written by `stda package` or a Hub id (org/name)"
        )
    try:
        return datasets.load_dataset(str(path) if local else name, name=config, revision=revision)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        where = "folder" if local else "Hub dataset"
        raise StdaError(
            f"cannot load {where} {name!r} ({type(err).__name__}: {err}); check the path or id, the network, "
            "or HF_HUB_OFFLINE (offline, only cached datasets load)"
        ) from err


def _check_columns(ds, split: str, dataset: str) -> None:
    from datasets import ClassLabel

    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise StdaError(
            f"split {split!r} of {dataset} lacks column(s) {missing}; found {ds.column_names}. "
            f"train.py needs {list(REQUIRED_COLUMNS)} (an Image and a ClassLabel benign/malignant)"
        )
    feature = ds.features["label"]
    if isinstance(feature, ClassLabel):
        if list(feature.names) != list(LABELS):
            raise StdaError(
                f"split {split!r} of {dataset}: label names {feature.names}; expected {list(LABELS)} in that order"
            )
    elif not set(ds.unique("label")) <= {0, 1}:
        raise StdaError(
            f"split {split!r} of {dataset}: labels {sorted(ds.unique('label'))[:5]}; expected 0 (benign), 1 (malignant)"
        )


def _check_both_classes(ds, dataset: str) -> None:
    counts = np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=len(LABELS))
    if np.any(counts == 0):
        raise StdaError(
            f"the train split of {dataset} has {dict(zip(LABELS, counts.tolist(), strict=True))} images; both classes are needed"
        )


def _real_only(ds, split: str):
    if "origin" not in ds.column_names:
        return ds
    n_synthetic = sum(1 for o in ds["origin"] if o != "real")
    if n_synthetic:
        raise StdaError(
            f"split {split!r} holds {n_synthetic} non-real image(s) (origin != 'real'); train, validation and "
            "test must be real images only (synthetic ones belong in the 'synthetic' split). Re-package the dataset"
        )
    return ds


def _synthetic(data, cfg: TrainConfig):
    if cfg.synthetic == "none":
        return None
    if "synthetic" not in data:
        raise StdaError(
            f"--synthetic {cfg.synthetic} needs a 'synthetic' split, but {cfg.dataset} has only {sorted(data)}; "
            "package the dataset with synthetic images (`stda package --synthetic ...`) or use --synthetic none"
        )
    ds = data["synthetic"]
    if cfg.min_confidence > 0:
        if "pseudo_label_confidence" not in ds.column_names:
            raise StdaError(
                f"--min-confidence needs a 'pseudo_label_confidence' column; the synthetic split has {ds.column_names}"
            )
        keep = [i for i, c in enumerate(ds["pseudo_label_confidence"]) if c >= cfg.min_confidence]
        logger.info(
            "min confidence %.2f keeps %d of %d synthetic images", cfg.min_confidence, len(keep), len(ds)
        )
        ds = ds.select(keep)
    if len(ds) == 0:
        raise StdaError(
            f"no synthetic images left (min confidence {cfg.min_confidence}); lower --min-confidence or use --synthetic none"
        )
    return ds


def _drop_bad_images(splits: Splits) -> None:
    """Decode every image once; leave out rows whose image is unusable and record them in ``splits.skipped``."""
    for name in (*SPLITS, "synthetic"):
        ds = getattr(splits, name)
        if ds is None:
            continue
        bad = _bad_rows(ds, name, splits.skipped)
        if bad:
            setattr(splits, name, ds.select(sorted(set(range(len(ds))) - set(bad))))


def _bad_rows(ds, split: str, report: SkipReport) -> list[int]:
    from datasets import Image as ImageFeature

    raw = ds.select_columns([c for c in ("image", "isic_id") if c in ds.column_names])
    raw = raw.cast_column("image", ImageFeature(decode=False))
    bad = []
    for i, row in enumerate(progress(raw, desc=f"checking {split} images", total=len(raw), unit="img")):
        where = f"{split} row {i}" + (f" ({row['isic_id']})" if "isic_id" in row else "")
        try:
            decode_image(row["image"], where)
        except BadImageError as err:
            report.add(err.path, err.reason)
            bad.append(i)
    return bad


class ImageLabelSet(Dataset):
    """A torch view of a ``datasets`` split: ``(transformed image tensor, class id)`` per row."""

    def __init__(self, ds, transform: Callable, split: str):
        from datasets import Image as ImageFeature

        self.ds = ds.select_columns(["image", "label"]).cast_column("image", ImageFeature(decode=False))
        self.transform = transform
        self.split = split
        self.labels = [int(x) for x in self.ds["label"]]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.ds[int(i)]
        return self.transform(decode_image(row["image"], f"{self.split} row {i}")), self.labels[i]


def build_transforms(cfg: TrainConfig, pre: Preprocessing, train: bool) -> Callable:
    """The image -> tensor pipeline: classic augmentation (training only), resize, scale, normalise.

    Geometric augmentation runs on a reflect-padded image that is cropped back to ``image_size`` afterwards,
    so rotations and shears never paint black corners (which phantoms use as an artifact).
    """
    from torchvision.transforms import v2

    if not (train and cfg.augment):
        return eval_transform(pre)
    size = pre.image_size
    steps: list[Any] = [v2.Resize((size, size), antialias=True)]
    if cfg.rotation or cfg.zoom or cfg.shear:
        zoom = (1 - cfg.zoom, 1 + cfg.zoom)
        steps += [v2.Pad(size // 4, padding_mode="reflect")]
        steps += [v2.RandomAffine(degrees=cfg.rotation, scale=zoom, shear=cfg.shear), v2.CenterCrop(size)]
    steps += [v2.RandomHorizontalFlip()] if cfg.hflip else []
    steps += [v2.RandomVerticalFlip()] if cfg.vflip else []
    if cfg.color_jitter:
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 4, 0.5)))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    return v2.Compose(steps)


class EpochSampler(Sampler[int]):
    """Training indices of one epoch, drawn from ``(seed, epoch)`` alone so that a resumed run sees the same order.

    Indices ``[0, n_always)`` (real images) appear in every epoch; ``n_draw`` further indices are drawn without
    replacement from ``[n_always, len(labels))`` (synthetic images), anew each epoch. With ``balanced`` the
    epoch is re-drawn with replacement, each class equally likely.

    Parameters
    ----------
    labels : sequence of int
        Class id of every index.
    n_always : int
        Indices used in every epoch.
    n_draw : int
        Indices drawn from the rest per epoch.
    balanced : bool
        Balanced sampling by class.
    seed : int
        Seed; with :meth:`set_epoch` it fixes the order.
    """

    def __init__(self, labels: Sequence[int], n_always: int, n_draw: int, balanced: bool, seed: int):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n_always = n_always
        self.n_draw = min(n_draw, len(self.labels) - n_always)
        self.balanced = balanced
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (Accelerate's data loader calls this too)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_always + self.n_draw

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        extra = rng.choice(len(self.labels) - self.n_always, size=self.n_draw, replace=False) + self.n_always
        pool = np.concatenate([np.arange(self.n_always), extra])
        if self.balanced:
            counts = np.bincount(self.labels[pool], minlength=len(LABELS))
            weights = 1.0 / counts[self.labels[pool]]
            return iter(rng.choice(pool, size=len(pool), replace=True, p=weights / weights.sum()).tolist())
        return iter(rng.permutation(pool).tolist())


def class_weights(labels: Sequence[int], n_always: int, n_draw: int) -> torch.Tensor:
    """Loss weights ``N / (2 n_c)`` from the expected class counts of one epoch of :class:`EpochSampler`."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels[:n_always], minlength=len(LABELS)).astype(np.float64)
    rest = labels[n_always:]
    if len(rest) and n_draw:
        counts += np.bincount(rest, minlength=len(LABELS)) * (min(n_draw, len(rest)) / len(rest))
    if np.any(counts == 0):
        missing = [LABELS[i] for i in np.flatnonzero(counts == 0)]
        logger.warning("these training images hold no %s image; that class gets weight 1", missing)
    weights = np.where(counts > 0, counts.sum() / (len(LABELS) * np.maximum(counts, 1e-12)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class Phase:
    """One stage of a run: which images an epoch draws and how the loss weighs classes."""

    name: str  # "pretrain" (synthetic images) or "train" (real, plus synthetic in mix mode)
    dataset: Dataset
    sampler: EpochSampler
    weights: torch.Tensor | None


def build_phases(splits: Splits, cfg: TrainConfig, transform: Callable) -> dict[str, Phase]:
    """The training phases of ``cfg``: ``train``, preceded by ``pretrain`` in pretrain mode."""
    real = ImageLabelSet(splits.train, transform, "train")
    phases = {}
    if cfg.synthetic == "pretrain":
        syn = ImageLabelSet(splits.synthetic, transform, "synthetic")
        phases["pretrain"] = _phase("pretrain", syn, syn.labels, len(syn), 0, cfg)
    if cfg.synthetic == "mix":
        syn = ImageLabelSet(splits.synthetic, transform, "synthetic")
        n_draw = round(cfg.synthetic_ratio * len(real))
        if n_draw > len(syn):
            logger.warning(
                "--synthetic-ratio %.2f asks for %d synthetic images per epoch; the split holds %d: using all",
                cfg.synthetic_ratio,
                n_draw,
                len(syn),
            )
        data = ConcatDataset([real, syn])
        phases["train"] = _phase("train", data, real.labels + syn.labels, len(real), n_draw, cfg)
    else:
        phases["train"] = _phase("train", real, real.labels, len(real), 0, cfg)
    return phases


def _phase(
    name: str, data: Dataset, labels: list[int], n_always: int, n_draw: int, cfg: TrainConfig
) -> Phase:
    sampler = EpochSampler(labels, n_always, n_draw, cfg.imbalance == "sampler", cfg.seed)
    weights = class_weights(labels, n_always, n_draw) if cfg.imbalance == "weights" else None
    return Phase(name, data, sampler, weights)


def make_loader(data: Dataset, cfg: TrainConfig, sampler: Sampler | None = None) -> DataLoader:
    """A data loader: the epoch sampler for training, the split in order (twice the batch) for evaluation."""
    batch = cfg.batch_size if sampler is not None else 2 * cfg.batch_size
    return DataLoader(
        data,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg.num_workers,
        drop_last=False,
        persistent_workers=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# Steps


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based): warm-up, then cosine/step/constant, restarting per phase."""
    start, length = _phase_span(cfg, epoch)
    e = epoch - start
    if e < cfg.warmup_epochs:
        return cfg.lr * (e + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "cosine":
        t = (e - cfg.warmup_epochs) / max(1, length - cfg.warmup_epochs)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** ((e - cfg.warmup_epochs) // cfg.step_size)
    return cfg.lr


def _phase_span(cfg: TrainConfig, epoch: int) -> tuple[int, int]:
    """(first epoch, number of epochs) of the phase ``epoch`` belongs to."""
    pre = cfg.pretrain_epochs if cfg.synthetic == "pretrain" else 0
    return (1, pre) if epoch <= pre else (pre + 1, cfg.epochs)


def phase_of(cfg: TrainConfig, epoch: int) -> str:
    """``pretrain`` or ``train``: the phase of ``epoch`` (1-based)."""
    return "pretrain" if cfg.synthetic == "pretrain" and epoch <= cfg.pretrain_epochs else "train"


def total_epochs(cfg: TrainConfig) -> int:
    """Epochs of the whole run (pretrain epochs included)."""
    return cfg.epochs + (cfg.pretrain_epochs if cfg.synthetic == "pretrain" else 0)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    accelerator,
    lr: float,
    epoch: int,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, images, images/s and seconds waiting for data vs computing.

    The loss is summed over every process; a non-finite mean loss stops the run (on every process alike).
    """
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    n = 0
    data_s = compute_s = 0.0
    bar = progress(total=len(loader), desc=f"epoch {epoch}", unit="step", disable=_quiet(accelerator))
    tick = time.perf_counter()
    for images, labels in loader:
        got_batch = time.perf_counter()
        data_s += got_batch - tick
        with accelerator.accumulate(model):
            loss = loss_fn(logits_of(model(images)).float(), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().double() * len(labels)
        n += len(labels)
        tick = time.perf_counter()
        compute_s += tick - got_batch
        bar.update(1)
    bar.close()
    totals = torch.stack([loss_sum, torch.tensor(float(n), dtype=torch.float64, device=accelerator.device)])
    total_loss, total_n = accelerator.reduce(totals, reduction="sum").tolist()
    return _epoch_stats(total_loss, total_n, data_s, compute_s, epoch)


def _epoch_stats(loss_sum: float, n: float, data_s: float, compute_s: float, epoch: int) -> dict[str, float]:
    loss = loss_sum / max(n, 1.0)
    if not math.isfinite(loss):
        raise StdaError(
            f"training loss became {loss} in epoch {epoch}; that epoch was not saved. Lower --lr, use "
            "--mixed-precision no or bf16, or check the images; then start a new run (or --resume with the "
            "same settings to retry from the last checkpoint)"
        )
    seconds = data_s + compute_s
    return {
        "loss": loss,
        "images": n,
        "images_per_second": n / seconds if seconds else 0.0,
        "data_seconds": data_s,
        "compute_seconds": compute_s,
    }


def _quiet(accelerator) -> bool | None:
    """Progress bars on the main process only (None lets ``progress`` decide there)."""
    return None if accelerator.is_main_process else True


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, C)`` and labels ``(N,)`` of every example, gathered from all processes (no duplicates)."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in progress(loader, desc="evaluating", unit="step", disable=_quiet(accelerator)):
        logits = logits_of(model(images)).float()
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, metric) -> dict[str, float]:
    """The metric module's results (confusion matrix as ``tn``/``fp``/``fn``/``tp``) plus the mean loss."""
    probs = logits.softmax(dim=-1)[:, 1]
    result = metric.compute(
        predictions=logits.argmax(dim=-1).tolist(),
        references=labels.tolist(),
        prediction_scores=probs.tolist(),
    )
    flat = {k: float(v) for k, v in result.items() if k != "confusion_matrix"}
    flat["loss"] = float(F.cross_entropy(logits, labels.long()))
    return flat


def evaluate(model: nn.Module, loader: DataLoader, accelerator, metric) -> dict[str, float]:
    """Metrics of ``model`` on ``loader``'s split, computed on the predictions gathered from every process."""
    logits, labels = predict(model, loader, accelerator)
    return compute_metrics(logits, labels, metric)


@dataclass
class EvalContext:
    """What an ``on_evaluate`` hook receives after each validation (and after the final test evaluation).

    The hook runs on every process (write files on ``accelerator.is_main_process`` only) and may return a dict
    of numbers, which are logged with the ``<split>/`` prefix. It must leave the model as it found it.
    """

    model: nn.Module  # the unwrapped model, in eval mode
    accelerator: Any  # the run's accelerate.Accelerator
    epoch: int  # epoch just finished (the best epoch for split "test")
    split: str  # "validation" or "test"
    dataset: Any  # this split's real images with every column (image, label, mask, artifact_mask, ids, ...)
    preprocessing: Preprocessing  # size, mean, std of the model's input
    transform: Callable  # PIL image -> normalised tensor, exactly as evaluation feeds the model
    metrics: dict[str, float]  # this evaluation's metrics
    run_dir: Path  # the run folder (heatmaps go in run_dir / "heatmaps")


EvalHook = Callable[[EvalContext], "dict[str, float] | None"]


# ----------------------------------------------------------------------------------------------------------------
# Run state, checkpoints, log


@dataclass
class RunState:
    """Progress of a run, saved as ``trainer_state.json`` in every checkpoint."""

    epoch: int = 0  # epochs completed
    best_score: float | None = None  # best validation value of the monitored metric
    best_epoch: int = 0  # epoch of best_score (0: none yet)
    bad_epochs: int = 0  # epochs since the last improvement
    stopped_early: bool = False  # early stopping ended the run
    best_metrics: dict[str, float] = field(default_factory=dict)  # validation metrics of the best epoch

    def update(self, metrics: dict[str, float], cfg: TrainConfig, epoch: int) -> bool:
        """Record ``epoch``'s validation metrics; True when it is the new best (real-image phase only)."""
        self.epoch = epoch
        if phase_of(cfg, epoch) != "train":
            return False
        score = metrics[cfg.monitor]
        if _improves(score, self.best_score, lower=cfg.monitor == "loss"):
            self.best_score, self.best_epoch, self.bad_epochs, self.best_metrics = (
                score,
                epoch,
                0,
                dict(metrics),
            )
            return True
        self.bad_epochs += 1
        self.stopped_early = 0 < cfg.early_stopping <= self.bad_epochs
        return False


def _improves(score: float, best: float | None, lower: bool) -> bool:
    if not math.isfinite(score):
        return False
    return best is None or (score < best if lower else score > best)


class JsonlTracker(GeneralTracker):
    """Accelerate tracker writing one JSON line per ``log`` call to ``log.jsonl`` (main process only)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def start(self) -> None:
        """Nothing to open: every record is appended and fsync'ed on its own."""

    def store_init_configuration(self, values: dict) -> None:
        """The resolved settings are in ``config.yaml``; nothing to add here."""

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        append_jsonl(self.path, {"epoch": step, **values})

    def finish(self) -> None:
        """Nothing to close."""

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch`` (logged by a run killed before its checkpoint)."""
        kept = [r for r in read_jsonl(self.path) if (r.get("epoch") or 0) <= epoch]
        write_text(self.path, "".join(_json_line(r) for r in kept))


def _json_line(record: dict) -> str:
    import json

    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


def checkpoint_dir(run_dir: Path, epoch: int | str) -> Path:
    """``checkpoints/epoch_NNNN`` (or ``checkpoints/best``) inside the run folder."""
    name = epoch if isinstance(epoch, str) else f"epoch_{epoch:04d}"
    return run_dir / "checkpoints" / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete epoch checkpoint (one with ``trainer_state.json``), or None."""
    folder = run_dir / "checkpoints"
    done = (
        sorted(p for p in folder.glob("epoch_*") if (p / "trainer_state.json").is_file())
        if folder.is_dir()
        else []
    )
    return done[-1] if done else None


def read_run_state(checkpoint: Path) -> RunState:
    """The :class:`RunState` saved in ``checkpoint``."""
    import json

    data = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return RunState(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(RunState)}})


def save_checkpoint(accelerator, folder: Path, state: RunState) -> None:
    """``save_state`` into a temporary folder, then move it over ``folder``: a kill never leaves half a checkpoint."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", dataclasses.asdict(state))
        _replace_dir(tmp, folder)
    accelerator.wait_for_everyone()


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f".old-{dst.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoints(run_dir: Path) -> None:
    """Finish or undo checkpoint moves a kill interrupted: restore ``.old-*`` folders, drop ``.tmp-*`` ones."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return
    for old in folder.glob(".old-*"):
        target = old.with_name(old.name[len(".old-") :])
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(target)
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` epoch checkpoints (the best one lives apart)."""
    done = sorted((run_dir / "checkpoints").glob("epoch_*"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    """The outcome of :func:`run_training`."""

    run_dir: Path
    status: str  # "finished", "stopped" (--stop-after-epoch) or "early-stopped"
    epochs: int  # epochs completed
    best_epoch: int
    validation: dict[str, float]  # validation metrics of the best epoch
    test: dict[str, float] | None  # test metrics of the final (best) model; None without a test split
    is_main_process: bool = True


@dataclass
class _Run:
    """Everything one run holds while training (internal)."""

    cfg: TrainConfig
    run_dir: Path
    accelerator: Any
    tracker: JsonlTracker
    splits: Splits
    preprocessing: Preprocessing
    eval_transform: Callable
    model: nn.Module
    optimizer: torch.optim.Optimizer
    phases: dict[str, Phase]
    loaders: dict[str, Any]
    loss_fns: dict[str, nn.Module]
    metric: Any
    on_evaluate: EvalHook | None
    state: RunState = field(default_factory=RunState)


def run_training(cfg: TrainConfig, on_evaluate: EvalHook | None = None) -> TrainResult:
    """Train, validate each epoch, checkpoint, stop early, then test the best model and write the run folder.

    Parameters
    ----------
    cfg : TrainConfig
        Settings (see ``train.py --help``).
    on_evaluate : callable, optional
        Called with an :class:`EvalContext` after each validation and after the test evaluation; the numbers
        it returns are logged. Default: explain ``cfg.explain_images`` fixed images with
        ``cfg.explain_method`` (:func:`stda_hf.explain_hook.explain_hook`), or nothing when that is 0.

    Returns
    -------
    TrainResult
        Status, epochs, best epoch and metrics.

    Raises
    ------
    StdaError
        Bad settings or dataset, a run folder in the way, a non-finite loss.
    """
    check_config(cfg)
    if on_evaluate is None and cfg.explain_images:
        from .explain_hook import explain_hook

        on_evaluate = explain_hook(cfg.explain_images, cfg.explain_method)
    run = _setup(cfg, on_evaluate)
    status = _fit(run)
    if status == "stopped":
        run.accelerator.end_training()
        return _result(run, status, None)
    test = _finish(run)
    run.accelerator.end_training()
    return _result(run, status, test)


def _setup(cfg: TrainConfig, on_evaluate: EvalHook | None) -> _Run:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    from .metrics import load_metric

    run_dir = Path(cfg.output_dir)
    if logging.getLogger("accelerate").level == logging.NOTSET:
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown ours
    tracker = JsonlTracker(run_dir / "log.jsonl")
    log_with = [tracker, "tensorboard"] if is_tensorboard_available() else [tracker]
    accelerator = Accelerator(
        cpu=_cpu_only_launch(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    )
    _check_world(accelerator)
    resume_from = _prepare_run_dir(cfg, run_dir, accelerator)
    with accelerator.main_process_first():
        splits = load_splits(cfg)
    _report_skipped(splits, run_dir, accelerator)
    pre = default_preprocessing(cfg.model, cfg.image_size)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.weights, seed=cfg.seed, **_model_options(cfg))
    run = _assemble(cfg, run_dir, accelerator, tracker, splits, pre, model, load_metric(), on_evaluate)
    _start(run, resume_from)
    return run


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _cpu_only_launch() -> bool:
    """True for several processes on a machine without accelerator (torchrun on CPUs): train with gloo.

    Accelerate treats several CPU processes as one distributed run only when asked (``cpu=True``); without it
    torchrun would start independent copies of the same run, all writing the same folder.
    """
    has_accelerator = getattr(torch, "accelerator", None)
    busy = has_accelerator.is_available() if has_accelerator is not None else torch.cuda.is_available()
    return _world_size() > 1 and not busy


def _check_world(accelerator) -> None:
    if accelerator.num_processes != _world_size():
        raise StdaError(
            f"launched as {_world_size()} processes but Accelerate runs {accelerator.num_processes}; launch with "
            "`torchrun --nproc_per_node N train.py` (CPUs) or `accelerate launch --multi_gpu` (GPUs)"
        )


def _model_options(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.model == "vgg8":
        return {
            "widths": cfg.vgg8_widths,
            "hidden": cfg.vgg8_hidden,
            "batch_norm": cfg.batch_norm,
            "dropout": cfg.dropout,
        }
    return {"dropout": cfg.dropout} if cfg.model in MODEL_NAMES else {}


def _assemble(cfg, run_dir, accelerator, tracker, splits, pre, model, metric, on_evaluate) -> _Run:
    eval_transform = build_transforms(cfg, pre, train=False)
    phases = build_phases(splits, cfg, build_transforms(cfg, pre, train=True))
    optimizer = _make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    loaders = {
        name: accelerator.prepare(make_loader(p.dataset, cfg, p.sampler)) for name, p in phases.items()
    }
    for split in SPLITS[1:]:
        if getattr(splits, split) is not None:
            data = ImageLabelSet(getattr(splits, split), eval_transform, split)
            loaders[split] = accelerator.prepare(make_loader(data, cfg))
    loss_fns = {
        name: nn.CrossEntropyLoss(weight=p.weights.to(accelerator.device) if p.weights is not None else None)
        for name, p in phases.items()
    }
    return _Run(
        cfg, run_dir, accelerator, tracker, splits, pre, eval_transform, model, optimizer, phases, loaders,
        loss_fns, metric, on_evaluate,
    )  # fmt: skip


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _start(run: _Run, resume_from: Path | None) -> None:
    """Restore the last checkpoint, or start fresh; then open the trackers."""
    acc = run.accelerator
    if resume_from is not None:
        acc.load_state(str(resume_from))  # model, optimizer, RNG states of every process
        run.state = read_run_state(resume_from)
        if acc.is_main_process:
            run.tracker.truncate_after(run.state.epoch)
        logger.info("resumed %s after epoch %d", run.run_dir, run.state.epoch)
    else:
        seed_everything(run.cfg.seed + acc.process_index)  # augmentation differs between processes
        if acc.is_main_process:
            _write_data_record(run)
    acc.wait_for_everyone()
    acc.init_trackers("stda", config=_flat_config(run.cfg))


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, accelerator) -> Path | None:
    """Check the run folder against --resume/--overwrite and write config.yaml; return the checkpoint to resume."""
    resume_from = None
    _check_run_dir(cfg, run_dir)  # on every process, before anything changes, so all refuse alike
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        recover_checkpoints(run_dir)
        dump_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if cfg.resume:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", run_dir)
    return resume_from


def _check_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not ((run_dir / "config.yaml").is_file() or (run_dir / "checkpoints").is_dir()):
        raise StdaError(
            f"--output-dir {run_dir} is not empty and holds no train.py run; choose another folder"
        )
    if cfg.overwrite:
        return
    if not cfg.resume:
        raise StdaError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start it again, "
            "or choose another --output-dir"
        )
    _check_same_settings(cfg, run_dir / "config.yaml")


def _check_same_settings(cfg: TrainConfig, saved_file: Path) -> None:
    saved = read_settings(saved_file)
    if saved is None:
        return
    now = config_to_dict(cfg)
    differ = sorted(changed_settings(saved, now, ignore=RUN_CONTROL, missing_is_change=False))
    if differ:
        pairs = describe_changes(saved, now, differ)
        raise StdaError(
            f"--resume with other settings than the run in {saved_file.parent} ({pairs}); a resumed run must use "
            f"the same settings (only {list(RUN_CONTROL)} may change). Use a new --output-dir for new settings"
        )


def _report_skipped(splits: Splits, run_dir: Path, accelerator) -> None:
    if len(splits.skipped) and accelerator.is_main_process:
        splits.skipped.save(run_dir / "skipped.json")
        logger.warning("%s; see %s", splits.skipped.summary(), run_dir / "skipped.json")


def _write_data_record(run: _Run) -> None:
    """``data.json`` (dataset, split sizes) and ``train_ids.txt`` (every image id trained on, for teacher checks)."""
    cfg, splits = run.cfg, run.splits
    trained_on = ["train"] + (["synthetic"] if splits.synthetic is not None else [])
    ids = sorted(i for name in trained_on for i in _ids(getattr(splits, name)))
    write_text(run.run_dir / "train_ids.txt", "".join(f"{i}\n" for i in ids))
    write_json(
        run.run_dir / "data.json",
        {
            "dataset": cfg.dataset,
            "dataset_config": cfg.dataset_config,
            "revision": cfg.revision,
            "splits": splits.sizes(),
            "trained_on_splits": trained_on,
            "evaluated_on_splits": [s for s in SPLITS[1:] if getattr(splits, s) is not None],
            "trained_on_ids": len(ids),
            "skipped_images": len(splits.skipped),
        },
    )


def _ids(ds) -> list[str]:
    return [str(i) for i in ds["isic_id"]] if ds is not None and "isic_id" in ds.column_names else []


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Settings as scalars (TensorBoard's hparams take no lists or None)."""
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()
    }


def _fit(run: _Run) -> str:
    """The epoch loop; returns "finished", "early-stopped" or "stopped"."""
    cfg, state = run.cfg, run.state
    if state.stopped_early:
        return "early-stopped"
    for epoch in range(state.epoch + 1, total_epochs(cfg) + 1):
        _run_epoch(run, epoch)
        if state.stopped_early:
            logger.info("early stopping after epoch %d (best: epoch %d)", epoch, state.best_epoch)
            return "early-stopped"
        if epoch == cfg.stop_after_epoch:
            logger.info("stopping after epoch %d as asked (--stop-after-epoch); --resume continues", epoch)
            return "stopped"
    return "finished"


def _run_epoch(run: _Run, epoch: int) -> None:
    cfg, acc = run.cfg, run.accelerator
    phase = phase_of(cfg, epoch)
    loader = run.loaders[phase]
    loader.set_epoch(epoch)
    stats = train_one_epoch(
        run.model, loader, run.optimizer, run.loss_fns[phase], acc, learning_rate(cfg, epoch), epoch
    )
    val = evaluate(run.model, run.loaders["validation"], acc, run.metric)
    extra = _hook(run, epoch, "validation", run.splits.validation, val)
    improved = run.state.update(val, cfg, epoch)
    record = {
        "phase": phase,
        "lr": learning_rate(cfg, epoch),
        **_prefix("train", stats),
        **_prefix("validation", val),
    }
    acc.log({**record, **_prefix("validation", extra)}, step=epoch)
    metrics_file = run.run_dir / "metrics" / f"validation-epoch_{epoch:04d}.json"
    _save_metrics(acc, metrics_file, {**val, **extra}, epoch, "validation")
    if improved:
        save_checkpoint(acc, checkpoint_dir(run.run_dir, "best"), run.state)
    save_checkpoint(acc, checkpoint_dir(run.run_dir, epoch), run.state)
    if acc.is_main_process:
        prune_checkpoints(run.run_dir, cfg.keep_checkpoints)
    _log_epoch(epoch, phase, stats, val, cfg.monitor, improved)


def _hook(run: _Run, epoch: int, split: str, dataset, metrics: dict[str, float]) -> dict[str, float]:
    if run.on_evaluate is None:
        return {}
    model = run.accelerator.unwrap_model(run.model)
    ctx = EvalContext(
        model,
        run.accelerator,
        epoch,
        split,
        dataset,
        run.preprocessing,
        run.eval_transform,
        metrics,
        run.run_dir,
    )
    return dict(run.on_evaluate(ctx) or {})


def _prefix(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in values.items()}


def _log_epoch(epoch, phase, stats, val, monitor, improved) -> None:
    logger.info(
        "epoch %d (%s): train loss %.4f, %.0f img/s | validation %s %.4f, balanced acc %.4f%s",
        epoch,
        phase,
        stats["loss"],
        stats["images_per_second"],
        monitor,
        val[monitor],
        val["balanced_accuracy"],
        " (best so far)" if improved else "",
    )


def _save_metrics(accelerator, path: Path, metrics: dict[str, float], epoch: int, split: str) -> None:
    """``evaluate.save`` the metrics with their context, written beside ``path`` and moved over it atomically."""
    import os

    import evaluate

    if not accelerator.is_main_process:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    record = {**metrics, "epoch": epoch, "split": split}
    try:
        with _stderr_silenced():  # evaluate.save asks git for the commit; outside a repository git complains
            evaluate.save(str(tmp), **record)
    except FileNotFoundError:  # no git installed: same record, without the commit and interpreter fields
        write_json(tmp, record)
    os.replace(tmp, path)


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 (child processes included) to /dev/null for the duration of the block."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _finish(run: _Run) -> dict[str, float] | None:
    """Restore the best checkpoint, test it, and write the final model, plots, metrics and model card."""
    from . import model_card

    acc, state = run.accelerator, run.state
    best = checkpoint_dir(run.run_dir, "best")
    if best.is_dir():
        acc.load_state(str(best))
    else:
        logger.warning("no validation improvement was ever recorded; the final model is the last epoch's")
    test, logits, labels = None, None, None
    if "test" in run.loaders:
        logits, labels = predict(run.model, run.loaders["test"], acc)
        test = compute_metrics(logits, labels, run.metric)
        test.update(_hook(run, state.best_epoch, "test", run.splits.test, test))
        _save_metrics(acc, run.run_dir / "metrics" / "test.json", test, state.best_epoch, "test")
        acc.log(_prefix("test", test), step=state.epoch)
    if acc.is_main_process:
        model_dir = run.run_dir / MODEL_DIR
        save_model(acc.unwrap_model(run.model), model_dir, run.preprocessing)
        model_card.write_run_card(model_dir, _card_facts(run, test), logits, labels)
        if run.cfg.push_to_hub:
            push_run(model_dir, run.cfg.hub_model_id, run.cfg.hub_private)
    acc.wait_for_everyone()
    return test


def _card_facts(run: _Run, test: dict[str, float] | None):
    from .model_card import RunFacts

    cfg, unwrapped = run.cfg, run.accelerator.unwrap_model(run.model)
    return RunFacts(
        config=config_to_dict(cfg),
        layers=layer_list(unwrapped),
        parameters=sum(p.numel() for p in unwrapped.parameters()),
        weights=describe_weights(cfg.model, cfg.weights, cfg.seed),
        split_sizes=run.splits.sizes(),
        best_epoch=run.state.best_epoch,
        epochs=run.state.epoch,
        stopped_early=run.state.stopped_early,
        validation=run.state.best_metrics,
        test=test,
        preprocessing=run.preprocessing,
        dataset_license=_dataset_license(cfg.dataset),
    )


def _dataset_license(dataset: str) -> str | None:
    """The licence in a local dataset folder's card (None when unknown; Hub cards are not fetched here)."""
    card = Path(dataset) / "README.md"
    if not card.is_file():
        return None
    try:
        from huggingface_hub import DatasetCard

        return DatasetCard.load(card).data.license
    except Exception:  # a malformed card must not fail a finished run
        logger.info("could not read the licence from %s", card)
        return None


def _result(run: _Run, status: str, test: dict[str, float] | None) -> TrainResult:
    state = run.state
    status = "early-stopped" if state.stopped_early and status != "stopped" else status
    return TrainResult(
        run.run_dir,
        status,
        state.epoch,
        state.best_epoch,
        state.best_metrics,
        test,
        run.accelerator.is_main_process,
    )


def push_run(model_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload a run's ``model/`` folder (weights, config, card, plots) to the Hub model repo ``repo_id``.

    The token comes from ``HF_TOKEN`` or ``hf auth login`` and is never printed; transient failures are retried
    (:func:`stda_hf.hub.upload_folder`, as ``stda push`` does). Checkpoints stay local.

    Raises
    ------
    StdaError
        No token, no permission, or the Hub unreachable.
    """
    from .hub import Upload, upload_folder

    upload = Upload(
        repo_id,
        repo_type="model",
        private=private,
        commit_message="Upload model trained with stda-hf train.py",
    )
    url = upload_folder(model_dir, upload)
    logger.info("pushed %s to %s", model_dir, repo_id)
    return url
