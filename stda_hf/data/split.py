"""Leakage-free train/validation/test splits of a real-image folder, grouped by lesion, patient and near-duplicates.

Images that share a lesion id, a patient id, or are near-duplicates by perceptual hash are joined into one
group (union-find), and whole groups are assigned to splits, stratified by class and seeded. The result is
``splits.csv`` (``isic_id, split, group``) and ``split_summary.json`` in the real-image folder.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np

from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.fileio import check_writable, csv_text, write_json, write_text
from stda_hf.core.utils import check_seed, progress
from stda_hf.data.images import SkipReport, load_image
from stda_hf.data.real import (
    MIN_PER_CLASS,
    SPLITS,
    RealImage,
    check_no_leakage,
    read_real_folder,
    small_classes,
)

logger = logging.getLogger(__name__)


@dataclass
class SplitConfig:
    """Settings of ``stda split``."""

    val: float = 0.15  # fraction of labelled images for validation
    test: float = 0.15  # fraction of labelled images for test
    seed: int = 0  # shuffles groups; same seed, same splits.csv
    phash_distance: int = (
        6  # near-duplicates: perceptual hashes at most this many bits apart (0-7; -1 disables)
    )
    min_per_class: int = MIN_PER_CLASS  # warn when validation or test holds fewer of a class (0: never)
    floor_per_class: int = 2  # refuse when validation or test holds fewer images of a class (0: allow none)

    def __post_init__(self) -> None:
        check_seed("--seed", self.seed)
        for name in ("val", "test"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise StdaError(f"--{name} {v} must be a fraction between 0 and 1 (e.g. 0.15)")
        if self.val + self.test >= 1.0:
            raise StdaError(
                f"--val {self.val} + --test {self.test} leaves no training images; keep the sum below 1"
            )
        if self.floor_per_class < 0 or self.min_per_class < 0:
            raise StdaError(
                f"--floor-per-class {self.floor_per_class} and --min-per-class {self.min_per_class} must be "
                "counts of 0 or more"
            )
        if not -1 <= self.phash_distance <= 7:
            raise StdaError(
                f"--phash-distance {self.phash_distance} must be between 0 and 7, or -1 to disable"
            )


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def perceptual_hashes(images: list[RealImage], report: SkipReport) -> dict[str, int]:
    """64-bit perceptual hash (pHash) of each loadable image, as ``{isic_id: int}``; bad files go to ``report``."""
    hashes = {}
    for im in progress(images, desc="perceptual hashes", unit="img"):
        try:
            h = imagehash.phash(load_image(im.path))
        except BadImageError as err:
            report.add(err.path, err.reason)
            continue
        hashes[im.isic_id] = int(str(h), 16)
    return hashes


def near_duplicate_pairs(hashes: dict[str, int], max_distance: int) -> list[tuple[str, str]]:
    """Pairs of ids whose 64-bit hashes differ in at most ``max_distance`` (<= 7) bits.

    Pigeonhole indexing: two hashes within 7 bits agree exactly on at least one of their 8 bytes, so only ids
    sharing a byte value at the same position are compared.
    """
    if max_distance < 0 or not hashes:
        return []
    ids = sorted(hashes)
    values = np.array([hashes[i] for i in ids], dtype=np.uint64)
    pairs = set()
    for byte in range(8):
        buckets = defaultdict(list)
        for idx, key in enumerate(((values >> np.uint64(8 * byte)) & np.uint64(0xFF)).tolist()):
            buckets[key].append(idx)
        for members in buckets.values():
            if len(members) < 2:
                continue
            m = np.array(members)
            xor = values[m][:, None] ^ values[m][None, :]
            dist = np.unpackbits(xor.view(np.uint8), axis=-1).reshape(len(m), len(m), 64).sum(-1)
            for a, b in zip(*np.nonzero(np.triu(dist <= max_distance, k=1)), strict=True):
                pairs.add((ids[m[a]], ids[m[b]]))
    return sorted(pairs)


def group_images(images: list[RealImage], duplicate_pairs: list[tuple[str, str]]) -> dict[str, str]:
    """``{isic_id: group}``: images sharing a lesion, a patient or a near-duplicate pair share a group.

    A ``duplicate_of`` metadata column (``stda import`` fills it from SIIM-ISIC 2020's duplicate list) joins an
    image to the one it duplicates as well. The group name is the smallest id in it, so it does not depend on
    the order of ``images``.
    """
    index = {im.isic_id: i for i, im in enumerate(images)}
    uf = _UnionFind(len(images))
    first_seen: dict[tuple[str, str], int] = {}
    for i, im in enumerate(images):
        for kind, key in (("lesion", im.lesion_id), ("patient", im.patient_id)):
            if key:
                uf.union(i, first_seen.setdefault((kind, key), i))
    listed = [(im.isic_id, im.extra.get("duplicate_of", "")) for im in images]
    for a, b in [*duplicate_pairs, *listed]:
        if a in index and b in index:
            uf.union(index[a], index[b])
    members = defaultdict(list)
    for i, im in enumerate(images):
        members[uf.find(i)].append(im.isic_id)
    return {iid: min(ids) for ids in members.values() for iid in ids}


def assign_groups(images: list[RealImage], groups: dict[str, str], cfg: SplitConfig) -> dict[str, str]:
    """Assign whole groups to splits, stratified by the group's class (malignant if any image is), seeded.

    Groups of each class are shuffled, then each goes to the split furthest below its target share.
    """
    group_label, group_size = _group_classes(images, groups)
    targets = {"test": cfg.test, "validation": cfg.val, "train": 1.0 - cfg.val - cfg.test}
    group_split = _fill_parts(group_label, group_size, targets, np.random.default_rng(cfg.seed))
    _meet_floor(images, groups, group_split, cfg.floor_per_class)
    return {im.isic_id: group_split[groups[im.isic_id]] for im in images}


def _meet_floor(images: list[RealImage], groups: dict[str, str], group_split: dict, floor: int) -> None:
    """Move whole groups from train into test and validation until each holds ``floor`` images of each class.

    The share-based deal can leave a held-out split without a class when groups are large (a patient with
    many images). Smallest groups go first (then by name), and train keeps at least ``floor`` images of the
    class; what cannot be met is left for :func:`check_class_counts` to refuse.
    """
    per_group: dict[str, Counter] = defaultdict(Counter)
    for im in images:
        per_group[groups[im.isic_id]][im.label] += 1
    for label in ("benign", "malignant"):
        for split in ("test", "validation"):

            def count(part: str, label: str = label) -> int:
                return sum(c[label] for g, c in per_group.items() if group_split[g] == part)

            candidates = sorted(
                (g for g, c in per_group.items() if group_split[g] == "train" and c[label]),
                key=lambda g: (sum(per_group[g].values()), g),
            )
            for g in candidates:
                if count(split) >= floor:
                    break
                if count("train") - per_group[g][label] >= floor:
                    group_split[g] = split


def _group_classes(images: list[RealImage], groups: dict[str, str]) -> tuple[dict[str, str], Counter]:
    """Class of each group (malignant if any of its images is) and its number of images."""
    group_label: dict[str, str] = {}
    group_size: Counter = Counter()
    for im in images:
        g = groups[im.isic_id]
        group_size[g] += 1
        if im.label == "malignant" or g not in group_label:
            group_label[g] = im.label
    return group_label, group_size


def _fill_parts(
    group_label: dict[str, str], group_size: Counter, targets: dict, rng: np.random.Generator
) -> dict[str, object]:
    """``{group: part}``: each class's groups, shuffled, go to the part furthest below its target share."""
    group_part = {}
    for label in sorted(set(group_label.values())):
        names = sorted(g for g, lab in group_label.items() if lab == label)
        names = [names[i] for i in rng.permutation(len(names))]
        total = sum(group_size[g] for g in names)
        filled = dict.fromkeys(targets, 0)
        for g in names:
            deficit = {s: targets[s] * total - filled[s] for s in targets}
            part = max(deficit, key=lambda s: deficit[s])
            group_part[g] = part
            filled[part] += group_size[g]
    return group_part


def make_splits(root: str | Path, cfg: SplitConfig | None = None) -> dict[str, dict[str, int]]:
    """Split a real-image folder and write ``splits.csv`` and ``split_summary.json`` into it.

    Parameters
    ----------
    root : path
        The real-image folder.
    cfg : SplitConfig, optional
        Fractions, seed and near-duplicate threshold.

    Returns
    -------
    dict
        ``{split: {class: count}}``, also written to ``split_summary.json``.

    Raises
    ------
    StdaError
        The folder is not a usable real-image folder, cannot be written (read-only), or a class is too small.
    """
    cfg = cfg or SplitConfig()
    folder = read_real_folder(root)
    check_writable(folder.root)  # before hashing every image, not after
    report = SkipReport()
    images = folder.labelled
    hashes = perceptual_hashes(images, report) if cfg.phash_distance >= 0 else {}
    images = [im for im in images if str(im.path) not in report.skipped]
    groups = group_images(images, near_duplicate_pairs(hashes, cfg.phash_distance))
    assignment = assign_groups(images, groups, cfg)
    check_no_leakage(images, assignment)
    summary = _summary(images, assignment, groups)
    small = check_class_counts(summary, folder.root, cfg.floor_per_class, cfg.min_per_class)
    write_text(folder.splits_path, _splits_csv(images, assignment, groups))
    write_json(
        folder.root / "split_summary.json",
        {
            "config": {
                "val": cfg.val,
                "test": cfg.test,
                "seed": cfg.seed,
                "phash_distance": cfg.phash_distance,
                "min_per_class": cfg.min_per_class,
                "floor_per_class": cfg.floor_per_class,
            },
            "counts": summary,
            "below_minimum": small,
            "groups": len(set(groups.values())),
            "skipped": report.skipped,
        },
    )
    if report:
        logger.warning("%s; they are left out of every split", report.summary())
    return summary


def _splits_csv(images: list[RealImage], assignment: dict[str, str], groups: dict[str, str]) -> str:
    rows = (
        {"isic_id": im.isic_id, "split": assignment[im.isic_id], "group": groups[im.isic_id]} for im in images
    )
    return csv_text(rows, ("isic_id", "split", "group"))


def _summary(images: list[RealImage], assignment: dict[str, str], groups: dict[str, str]) -> dict:
    out = {s: dict.fromkeys(("benign", "malignant"), 0) for s in SPLITS}
    for im in images:
        out[assignment[im.isic_id]][im.label] += 1
    for s in SPLITS:
        out[s]["groups"] = len({groups[im.isic_id] for im in images if assignment[im.isic_id] == s})
    return out


def check_class_counts(summary: dict, root: Path, floor: int, minimum: int) -> list[str]:
    """Refuse held-out splits below ``floor`` images of a class; warn (and return one line each) below ``minimum``.

    Train only needs to be non-empty. Below the floor a split cannot measure its class: with one image,
    sensitivity (or specificity) is 0 or 1 and ROC AUC is that one image's rank, and calibration cannot hold
    an image of that class out of its own fit. Below the minimum every image of the class moves the split's
    sensitivity by more than 10 points, and even a perfect score's exact 95 % interval reaches below 0.70.

    Raises
    ------
    StdaError
        A split without images, or a validation/test class below ``floor``, naming every one.
    """
    for split in SPLITS:
        if summary[split]["benign"] + summary[split]["malignant"] == 0:
            raise StdaError(
                f"{root}: the {split} split would be empty (too few lesion/patient groups for these fractions); "
                "add images or change --val/--test"
            )
    held_out = [
        (s, label, summary[s][label]) for s in ("validation", "test") for label in ("benign", "malignant")
    ]
    short = [f"{s} {n} {label}" for s, label, n in held_out if n < floor]
    if short:
        raise StdaError(
            f"{root}: {', '.join(short)} image(s), below the floor of {floor} per class (too few lesion/patient "
            "groups of that class to deal out): a split cannot measure a class it holds fewer of. Add images, "
            "raise --val/--test, or lower --floor-per-class (0 allows a missing class)"
        )
    small = small_classes(summary, minimum)
    for line in small:
        logger.warning("%s: metrics of that class on it are coarse; add images or raise --val/--test", line)
    return small


@dataclass
class Folds:
    """k grouped, class-stratified cross-validation folds of a real-image folder (see :func:`make_folds`)."""

    images: list[RealImage]  # the labelled, loadable images the folds cover, in id order
    groups: dict[str, str]  # isic_id -> group (lesion, patient and near-duplicates joined)
    assignments: list[dict[str, str]]  # per fold: isic_id -> "train" | "validation" | "test"
    skipped: dict[str, str]  # unreadable files left out of every fold, path -> reason

    def __len__(self) -> int:
        return len(self.assignments)

    def splits_csv(self, fold: int) -> str:
        """The ``splits.csv`` text (``isic_id, split, group``) of one fold."""
        return _splits_csv(self.images, self.assignments[fold], self.groups)

    def summary(self, fold: int) -> dict[str, dict[str, int]]:
        """``{split: {class: count, "groups": n}}`` of one fold."""
        return _summary(self.images, self.assignments[fold], self.groups)


def make_folds(
    root: str | Path, k: int = 5, seed: int = 0, val: float = 0.15, phash_distance: int = 6
) -> Folds:
    """Cross-validation folds grouped exactly as ``stda split`` groups (lesion, patient, near-duplicates).

    Whole groups are dealt to ``k`` parts, stratified by class and seeded; fold ``i`` tests on part ``i`` and
    draws its validation split (``val`` of all images, stratified) from the other parts' groups, so every
    image is tested exactly once and no lesion or patient spans two splits of a fold.

    Parameters
    ----------
    root : path
        The real-image folder (its own ``splits.csv``, if any, is ignored).
    k : int
        Number of folds (at least 2).
    seed : int
        Shuffles groups; same seed, same folds.
    val : float
        Fraction of all labelled images that each fold uses for validation.
    phash_distance : int
        Near-duplicate threshold of :class:`SplitConfig` (-1 disables).

    Raises
    ------
    StdaError
        Bad ``k`` or ``val``, or a fold whose train, validation or test split would be empty.
    """
    if k < 2:
        raise StdaError(f"k={k} folds: cross-validation needs at least 2")
    val_share = val / (1.0 - 1.0 / k)
    if not 0.0 < val_share < 1.0:
        raise StdaError(
            f"val={val} with k={k} leaves no training images; use a fraction below {1 - 1 / k:.2f}"
        )
    folder = read_real_folder(root)
    report = SkipReport()
    hashes = perceptual_hashes(folder.labelled, report) if phash_distance >= 0 else {}
    images = [im for im in folder.labelled if str(im.path) not in report.skipped]
    groups = group_images(images, near_duplicate_pairs(hashes, phash_distance))
    group_label, group_size = _group_classes(images, groups)
    part = _fill_parts(group_label, group_size, dict.fromkeys(range(k), 1.0 / k), np.random.default_rng(seed))
    folds = Folds(images=images, groups=groups, assignments=[], skipped=report.skipped)
    for fold in range(k):
        rest = {g: lab for g, lab in group_label.items() if part[g] != fold}
        targets = {"validation": val_share, "train": 1.0 - val_share}
        side = _fill_parts(rest, group_size, targets, np.random.default_rng([seed, fold]))
        folds.assignments.append({im.isic_id: side.get(groups[im.isic_id], "test") for im in images})
        check_no_leakage(images, folds.assignments[fold])
        check_class_counts(folds.summary(fold), Path(f"{folder.root} (fold {fold})"), floor=0, minimum=1)
    return folds
