"""Training data: the dataset's splits (real only where it matters), decoding checks, transforms, the epoch
sampler, class weights and the loaders of each phase."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from stda_hf import LABELS, SPLITS
from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.utils import progress
from stda_hf.data.images import Fit, SkipReport, decode_image
from stda_hf.models.vgg import (
    Preprocessing,
    eval_transform,
)
from stda_hf.training.config import REQUIRED_COLUMNS, TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """The splits a run uses: real train, validation and test, and the (filtered) synthetic images."""

    train: Any  # datasets.Dataset of real training images
    validation: Any  # real images only
    test: Any | None  # real images only; None when the dataset has no test split
    synthetic: Any | None  # pseudo-labelled synthetic images; None unless --synthetic mix|pretrain|only
    skipped: SkipReport = field(default_factory=SkipReport)  # undecodable images left out
    revision: str | None = None  # the Hub commit loaded (a Hub id whose commit the Hub told); else None

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
    commit = None
    if cfg.train_dir is not None:
        data = _load_image_folders(cfg.train_dir, cfg.validation_dir)
    else:
        commit = hub_commit(cfg.dataset, cfg.revision) if is_hub_id(cfg.dataset) else None
        data = _load_dataset(cfg.dataset, cfg.dataset_config, commit or cfg.revision)
    data = {name: _adapt_columns(ds, name, cfg) for name, ds in data.items()}
    if "train" in data and "validation" not in data and cfg.train_val_split > 0:
        data["train"], data["validation"] = split_off_validation(data["train"], cfg.train_val_split, cfg.seed)
        logger.info(
            "no validation split: %d of the training images moved to validation (--train-val-split %g)",
            len(data["validation"]),
            cfg.train_val_split,
        )
    for name in SPLITS[:2]:  # train and validation are required
        if name not in data:
            raise StdaError(f"dataset {cfg.dataset} has no {name!r} split; splits found: {sorted(data)}")
    data = _at_most(data, cfg)
    for name, ds in data.items():
        _check_columns(ds, name, cfg.dataset)
    _check_both_classes(data["train"], cfg.dataset)
    splits = Splits(
        train=_real_only(data["train"], "train"),
        validation=_real_only(data["validation"], "validation"),
        test=_real_only(data["test"], "test") if "test" in data else None,
        synthetic=_synthetic(data, cfg),
        revision=commit,
    )
    if splits.test is None:
        logger.warning("dataset %s has no 'test' split: the run ends without test metrics", cfg.dataset)
    if cfg.check_images:
        _drop_bad_images(splits)
    return splits


def _load_image_folders(train_dir: str, validation_dir: str | None):
    """``--train-dir`` (and ``--validation-dir``) as ``datasets``' ``imagefolder``: one sub-folder per class."""
    import datasets

    files = {}
    for split, folder, flag in (
        ("train", train_dir, "--train-dir"),
        ("validation", validation_dir, "--validation-dir"),
    ):
        if folder is None:
            continue
        if not Path(folder).is_dir():
            raise StdaError(
                f"{flag} {folder}: no such folder; give a folder with one sub-folder of images per class"
            )
        files[split] = str(Path(folder) / "**")
    try:
        return dict(datasets.load_dataset("imagefolder", data_files=files))
    except (FileNotFoundError, ValueError) as err:
        raise StdaError(f"cannot read the image folders {sorted(files.values())} ({err})") from err


def split_off_validation(train, share: float, seed: int):
    """(train, validation): about ``share`` of ``train`` moved to validation, drawn with ``seed``.

    Whole lesions move together (``lesion_id``, else ``patient_id``, else each image alone), so no lesion is in
    both: the example script's random ``train_test_split`` would put views of one lesion on both sides.
    """
    column = next((c for c in ("lesion_id", "patient_id") if c in train.column_names), None)
    keys = [str(k) if k is not None else f"row-{i}" for i, k in enumerate(train[column])] if column else None
    keys = keys or [f"row-{i}" for i in range(len(train))]
    groups = sorted(set(keys))
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    wanted, chosen, taken = share * len(train), set(), 0
    sizes = {g: 0 for g in groups}
    for k in keys:
        sizes[k] += 1
    for g in groups:
        if taken >= wanted:
            break
        chosen.add(g)
        taken += sizes[g]
    held = [i for i, k in enumerate(keys) if k in chosen]
    kept = [i for i, k in enumerate(keys) if k not in chosen]
    if not held or not kept:
        raise StdaError(
            f"--train-val-split {share}: {len(train)} training image(s) cannot be split; give a validation split"
        )
    return train.select(kept), train.select(held)


def _at_most(data: dict, cfg: TrainConfig) -> dict:
    """``--max-train-samples`` / ``--max-eval-samples``: that many rows of train / validation and test, drawn
    with ``--seed`` as the example script draws them (``shuffle(seed).select(range(n))``)."""
    limits = {
        "train": cfg.max_train_samples,
        "validation": cfg.max_eval_samples,
        "test": cfg.max_eval_samples,
    }
    out = dict(data)
    for split, n in limits.items():
        if n is not None and split in out and n < len(out[split]):
            out[split] = out[split].shuffle(seed=cfg.seed).select(range(n))
    return out


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub id (``org/name``) rather than a local folder."""
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of Hub dataset ``repo_id`` at ``revision`` (``main`` when None, as ``datasets`` loads), or
    None when the Hub cannot say (offline, a mirror without the API): the run then loads ``revision`` as given.

    The run loads exactly this commit, so the one recorded in ``data.json`` and the model card is the one
    trained on, even if the branch moves meanwhile.
    """
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(repo_id, revision=revision or "main").sha
    except Exception as err:  # offline mode, no network, not found: load_dataset gives the user-facing error
        logger.info(
            "could not resolve the commit of %s (%s); loading it as given", repo_id, type(err).__name__
        )
        return None


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


def _adapt_columns(ds, split: str, cfg: TrainConfig):
    """``ds`` with ``--image-column``/``--label-column`` renamed to ``image``/``label`` and ``--label-map`` applied
    (the label becoming a ClassLabel benign/malignant); other datasets' conventions meet ours here."""
    for ours, theirs, flag in (
        ("image", cfg.image_column, "--image-column"),
        ("label", cfg.label_column, "--label-column"),
    ):
        if theirs == ours:
            continue
        if theirs not in ds.column_names:
            raise StdaError(
                f"{flag} {theirs!r}: split {split!r} of {cfg.dataset} has no such column; found {ds.column_names}"
            )
        if ours in ds.column_names:
            ds = ds.remove_columns(ours)
        ds = ds.rename_column(theirs, ours)
    if cfg.label_map is None or "label" not in ds.column_names:
        return ds
    return _map_labels(ds, split, cfg)


def _map_labels(ds, split: str, cfg: TrainConfig):
    """Replace the label column by its ``--label-map`` classes (values compared as text: names or numbers)."""
    from datasets import ClassLabel

    from stda_hf.training.config import parse_label_map

    mapping = parse_label_map(cfg.label_map)
    feature = ds.features["label"]
    values = [feature.int2str(v) if isinstance(feature, ClassLabel) else str(v) for v in ds["label"]]
    unmapped = sorted(set(values) - set(mapping))
    if unmapped:
        raise StdaError(
            f"--label-map does not map label value(s) {unmapped[:10]} of split {split!r}; add them, e.g. "
            f"'{unmapped[0]}:benign', so every image has a class"
        )
    ids = [LABELS.index(mapping[v]) for v in values]
    return ds.remove_columns("label").add_column("label", ids, feature=ClassLabel(names=list(LABELS)))


def _check_columns(ds, split: str, dataset: str) -> None:
    from datasets import ClassLabel

    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise StdaError(
            f"split {split!r} of {dataset} lacks column(s) {missing}; found {ds.column_names}. "
            f"train.py needs {list(REQUIRED_COLUMNS)} (an Image and a ClassLabel benign/malignant); name other "
            "columns with --image-column / --label-column, and map other labels with --label-map"
        )
    feature = ds.features["label"]
    if isinstance(feature, ClassLabel):
        if list(feature.names) != list(LABELS):
            raise StdaError(
                f"split {split!r} of {dataset}: label names {feature.names}; expected {list(LABELS)} in that "
                "order, or map them with --label-map (e.g. 'nv:benign,mel:malignant')"
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
    """The image -> tensor pipeline: resize (``pre.resize`` mode), classic augmentation (training only), scale,
    normalise.

    Every split goes through the same geometry first (:class:`~stda_hf.data.images.Fit`: crop, pad or squash to
    ``image_size``), so augmentation sees the square that evaluation sees. Geometric augmentation runs on a
    reflect-padded image that is cropped back to ``image_size`` afterwards, so rotations and shears never paint
    black corners (which phantoms use as an artifact).
    """
    from torchvision.transforms import v2

    if not (train and cfg.augment):
        return eval_transform(pre)
    size = pre.image_size
    steps: list[Any] = [Fit(size, pre.resize)]
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
    if cfg.synthetic == "only":  # the synthetic split alone; validation and test stay real
        syn = ImageLabelSet(splits.synthetic, transform, "synthetic")
        return {"train": _phase("train", syn, syn.labels, len(syn), 0, cfg)}
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
    batch = cfg.batch_size if sampler is not None else (cfg.eval_batch_size or 2 * cfg.batch_size)
    return DataLoader(
        data,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg.num_workers,
        drop_last=False,
        persistent_workers=False,
    )
