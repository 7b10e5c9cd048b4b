"""The real-image folder: reading and validating what ``fetch``, ``import`` and ``phantoms`` write, and ``splits.csv``.

Two layouts are accepted:

* ISIC layout: ``images/<id>.<ext>`` plus ``metadata.csv`` with isic-cli's columns: ``isic_id`` and
  ``diagnosis_1`` are needed (:data:`NEEDED_COLUMNS`), the others of :data:`REQUIRED_COLUMNS` may be absent or
  empty, which means unknown; optional lesion masks named ``masks/<id>.png`` or the ISIC way
  ``masks/<id>_segmentation.png`` (any case of ``Segmentation``), ``artifacts/<id>.png`` (artifact label maps,
  written by the phantom maker, codes from :data:`ARTIFACTS`), and ``splits.csv`` once ``stda split`` has run
  (read and checked here, :func:`load_splits`, since it is this folder's contract).
* ImageFolder layout: ``benign/`` and ``malignant/`` sub-folders of images (any case: ``Malignant/``); ids are
  the file stems, lesion and patient are unknown, licence and attribution are ``unknown``.

Any format Pillow reads is an image. Every file the folder holds but the reader leaves out (not an image, a
sub-folder, an image without a metadata row, an image outside the class folders) is listed with its reason
in :attr:`RealFolder.left_out`, which ``stda inspect`` prints. Two files with one id (``x.jpg`` and ``x.png``)
are refused: which one is meant cannot be guessed.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stda_hf import LABELS, SPLITS
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import open_csv, write_csv
from stda_hf.core.utils import first_few
from stda_hf.data.images import why_not_an_image

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = (
    "isic_id",
    "diagnosis_1",
    "lesion_id",
    "patient_id",
    "image_type",
    "copyright_license",
    "attribution",
)
"""isic-cli's provenance columns: every ``metadata.csv`` this project writes starts with them."""

NEEDED_COLUMNS = ("isic_id", "diagnosis_1")
"""The columns a ``metadata.csv`` must have to be read; the rest of :data:`REQUIRED_COLUMNS` may be absent."""

OPTIONAL_COLUMNS = tuple(c for c in REQUIRED_COLUMNS if c not in NEEDED_COLUMNS)
"""Provenance columns that may be absent or empty: both mean unknown (licence and attribution read ``unknown``)."""

MASK_SUFFIX = re.compile(r"_segmentation$", re.IGNORECASE)
"""ISIC names a lesion mask ``<id>_segmentation.png`` (2016 and its task 3B: ``_Segmentation``)."""
DIAGNOSIS_TO_LABEL = {"Benign": "benign", "Malignant": "malignant", "Indeterminate": None}
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

ARTIFACTS = ("ruler", "patch", "ink", "dark_corners")
"""Artifact kinds; their code in the ``artifacts/<id>.png`` label map is their position here plus one."""

MIN_PER_CLASS = 10
"""Fewer images of a class than this in validation or test is flagged by ``stda split`` and ``stda inspect``:
each image then moves the class's sensitivity by more than 10 points, and even a perfect score's exact 95 %
interval reaches below 0.70."""

PHANTOM_ATTRIBUTION = "stda-hf phantom generator (procedural, no patient data)"
"""The attribution of every phantom image: a folder whose images all carry it holds no patient data."""


@dataclass(frozen=True)
class RealImage:
    """One real image and its provenance (a row of ``metadata.csv``)."""

    isic_id: str
    path: Path
    label: str | None  # "benign" | "malignant"; None for Indeterminate (kept, never trained on)
    diagnosis_1: str
    lesion_id: str  # "" when unknown
    patient_id: str  # "" when unknown
    image_type: str
    copyright_license: str
    attribution: str
    mask_path: Path | None = None  # binary lesion mask, when the folder has one
    artifact_path: Path | None = None  # artifact label map (phantoms), when the folder has one
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)  # other metadata columns


@dataclass
class RealFolder:
    """A validated real-image folder: every image with metadata, in id order."""

    root: Path
    layout: str  # "isic" or "imagefolder"
    images: list[RealImage]
    left_out: dict[str, str] = field(
        default_factory=dict
    )  # file or folder -> why it is not one of the images

    def __post_init__(self) -> None:
        self._by_id = {im.isic_id: im for im in self.images}
        self._splits: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, isic_id: str) -> RealImage:
        try:
            return self._by_id[isic_id]
        except KeyError:
            raise StdaError(f"image id {isic_id!r} is not in {self.root}") from None

    def __contains__(self, isic_id: object) -> bool:
        return isic_id in self._by_id

    @property
    def labelled(self) -> list[RealImage]:
        """Images with a benign or malignant label (Indeterminate excluded)."""
        return [im for im in self.images if im.label is not None]

    @property
    def splits_path(self) -> Path:
        return self.root / "splits.csv"

    def splits(self) -> dict[str, str]:
        """``{isic_id: split}`` from ``splits.csv``; a clear error when ``stda split`` has not run."""
        if self._splits is None:
            self._splits = load_splits(self)
        return self._splits

    def unsplit(self) -> list[RealImage]:
        """Labelled images that ``splits.csv`` does not assign (added after ``stda split`` ran): in no split."""
        assignment = self.splits()
        return [im for im in self.labelled if im.isic_id not in assignment]

    def subset(self, split: str, label: str | None = None) -> list[RealImage]:
        """Labelled images of one split (``train``, ``validation`` or ``test``), optionally of one class."""
        if split not in SPLITS:
            raise StdaError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
        if label is not None and label not in LABELS:
            raise StdaError(f"unknown label {label!r}; valid labels: {list(LABELS)}")
        assignment = self.splits()
        return [
            im
            for im in self.labelled
            if assignment.get(im.isic_id) == split and (label is None or im.label == label)
        ]


def read_real_folder(root: str | Path) -> RealFolder:
    """Read and validate a real-image folder in either layout.

    Raises
    ------
    StdaError
        Missing folder or metadata, missing columns, unknown diagnosis, duplicate or unsafe id, or a metadata
        row whose image file is missing. The message names the file, row or value and what to do.
    """
    root = Path(root)
    if not root.is_dir():
        raise StdaError(
            f"real-image folder {root} does not exist; create it with `stda fetch`, `stda import` (a challenge folder or HAM10000 as downloaded) or `stda phantoms`"
        )
    left_out: dict[str, str] = {}
    if (root / "metadata.csv").is_file():
        images = _read_isic_layout(root, left_out)
        layout = "isic"
    elif _class_folders(root):
        images = _read_imagefolder(root, left_out)
        layout = "imagefolder"
    else:
        raise StdaError(
            f"{root} is not a real-image folder: expected metadata.csv with images/ (what `stda fetch` and "
            f"`stda phantoms` write) or sub-folders {list(LABELS)}"
        )
    if not images:
        raise StdaError(
            f"{root} holds no images" + (f" ({len(left_out)} file(s) left out)" if left_out else "")
        )
    if left_out:
        logger.warning(
            "%s: %d file(s) left out, e.g. %s (%s); `stda inspect %s` lists them all",
            root,
            len(left_out),
            *next(iter(sorted(left_out.items()))),
            root,
        )
    images = sorted(images, key=lambda im: im.isic_id)
    return RealFolder(root=root, layout=layout, images=images, left_out=dict(sorted(left_out.items())))


def load_splits(folder: RealFolder) -> dict[str, str]:
    """Read ``splits.csv`` of ``folder`` and check it: known ids and splits, no lesion or patient on two sides.

    Raises
    ------
    StdaError
        When the file is missing (run ``stda split``), names an unknown id or split, or leaks.
    """
    path = folder.splits_path
    if not path.is_file():
        raise StdaError(f"{path} not found; run `stda split {folder.root}` first")
    assignment = {}
    with open_csv(path) as reader:
        if not {"isic_id", "split"} <= set(reader.fieldnames or []):
            raise StdaError(f"{path} needs columns isic_id and split; re-run `stda split {folder.root}`")
        for row_no, row in enumerate(reader, start=2):
            if row["split"] not in SPLITS:
                raise StdaError(
                    f"{path} line {row_no}: unknown split {row['split']!r}; valid: {list(SPLITS)}"
                )
            if row["isic_id"] not in folder:
                raise StdaError(
                    f"{path} line {row_no}: id {row['isic_id']!r} is not in {folder.root}/metadata.csv"
                )
            assignment[row["isic_id"]] = row["split"]
    check_no_leakage(folder.images, assignment)
    return assignment


def check_no_leakage(images: list[RealImage], assignment: dict[str, str]) -> None:
    """Raise when a lesion or patient has images in more than one split.

    Raises
    ------
    StdaError
        Naming the lesion or patient and the splits it spans.
    """
    for kind in ("lesion_id", "patient_id"):
        sides = defaultdict(set)
        for im in images:
            key = getattr(im, kind)
            if key and im.isic_id in assignment:
                sides[key].add(assignment[im.isic_id])
        for key, found in sorted(sides.items()):
            if len(found) > 1:
                raise StdaError(
                    f"leakage: {kind.removesuffix('_id')} {key} has images in {sorted(found)}; every lesion and "
                    "patient must sit on one side. Re-run `stda split` instead of editing splits.csv by hand"
                )


def check_leakage(train_side: Iterable[RealImage], held_out: Iterable[RealImage]) -> None:
    """Refuse when a lesion or patient of the training side (real train images and the sources of synthetic
    images) also appears in validation or test.

    Raises
    ------
    StdaError
        Naming the lesion or patient ids found on both sides.
    """
    held_out = list(held_out)
    for kind in ("lesion_id", "patient_id"):
        held = {getattr(im, kind) for im in held_out} - {""}
        both = sorted({getattr(im, kind) for im in train_side if getattr(im, kind) in held})
        if both:
            raise StdaError(
                f"leakage: {kind.removesuffix('_id')}(s) {first_few(both)} appear both in train (or among the "
                "sources of synthetic images) and in validation/test; re-run `stda split`, then `stda generate`"
            )


def untrained_sources(
    records: Iterable[Mapping], folder: RealFolder, assignment: Mapping[str, str]
) -> list[str]:
    """Every content or style image of synthetic ``records`` (``id``, ``content_id``, ``style_id``) that is not a
    train image of ``folder``, one line each naming the synthetic id and where its source is; empty when clean.

    Synthetic images may derive from train images only (content AND style); ``package`` and the benchmark's
    fold check both hold a synthetic folder to this.
    """
    bad = []
    for rec in records:
        for role in ("content_id", "style_id"):
            source = rec[role]
            if source not in folder:
                bad.append(f"{rec['id']} ({role.removesuffix('_id')} {source} is not in {folder.root})")
            elif assignment.get(source) != "train":
                where = assignment.get(source, "no split")
                bad.append(f"{rec['id']} ({role.removesuffix('_id')} {source} is in {where}, not train)")
    return bad


def metadata_columns(rows: Iterable[Mapping[str, str]]) -> list[str]:
    """The columns of a ``metadata.csv`` for ``rows``: :data:`REQUIRED_COLUMNS` first, then the others as they come."""
    return [*REQUIRED_COLUMNS, *dict.fromkeys(c for r in rows for c in r if c not in REQUIRED_COLUMNS)]


def write_metadata(root: str | Path, rows: list[dict[str, str]]) -> Path:
    """Write ``root/metadata.csv`` atomically (one row per image, the columns of :func:`metadata_columns`)."""
    path = Path(root) / "metadata.csv"
    write_csv(path, rows, metadata_columns(rows))
    return path


def check_id(isic_id: str, where: str) -> str:
    """Return ``isic_id`` when it is safe to use in a file name; otherwise raise naming ``where``."""
    if not SAFE_ID.match(isic_id or ""):
        raise StdaError(
            f"{where}: image id {isic_id!r} is not a safe file name (letters, digits, '_', '.', '-' only)"
        )
    return isic_id


def _index_files(folder: Path, left_out: dict[str, str] | None = None) -> dict[str, Path]:
    """Map id (file stem) -> path for the image files directly inside ``folder``.

    Everything else in it goes into ``left_out`` with the reason.

    Raises
    ------
    StdaError
        When two image files share one id (``x.jpg`` and ``x.png``), naming both.
    """
    if not folder.is_dir():
        return {}
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        reason = why_not_an_image(p)
        if reason is not None:
            if left_out is not None:
                left_out[str(p)] = reason
            continue
        if p.stem in files:
            raise StdaError(
                f"two files for one image id {p.stem!r}: {files[p.stem]} and {p}; delete or rename one of them"
            )
        files[p.stem] = p
    return files


def _read_isic_layout(root: Path, left_out: dict[str, str]) -> list[RealImage]:
    meta = root / "metadata.csv"
    files = _index_files(root / "images", left_out)
    artifacts = _index_files(root / "artifacts")
    masks = _index_masks(root / "masks", left_out)
    with open_csv(meta) as reader:
        missing = [c for c in NEEDED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise StdaError(
                f"{meta} lacks column(s) {missing}; it needs {list(NEEDED_COLUMNS)} and may add "
                f"{list(OPTIONAL_COLUMNS)} (empty or absent: unknown). `stda import` writes it from ISIC "
                "challenge folders, isic-cli exports and HAM10000"
            )
        images, seen, absent = [], set(), []
        for row_no, row in enumerate(reader, start=2):
            where = f"{meta} line {row_no}"
            isic_id = check_id((row["isic_id"] or "").strip(), where)
            if isic_id in seen:
                raise StdaError(f"{where}: duplicate image id {isic_id!r}; each image must appear once")
            seen.add(isic_id)
            diagnosis = (row["diagnosis_1"] or "").strip()
            if diagnosis not in DIAGNOSIS_TO_LABEL:
                raise StdaError(
                    f"{where}: unknown diagnosis_1 {diagnosis!r} for {isic_id}; valid values: {list(DIAGNOSIS_TO_LABEL)}"
                )
            if isic_id not in files:
                absent.append(f"{isic_id} (line {row_no})")
                continue
            extra = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS and k is not None}
            images.append(
                RealImage(
                    isic_id=isic_id,
                    path=files[isic_id],
                    label=DIAGNOSIS_TO_LABEL[diagnosis],
                    diagnosis_1=diagnosis,
                    lesion_id=_cell(row, "lesion_id"),
                    patient_id=_cell(row, "patient_id"),
                    image_type=_cell(row, "image_type"),
                    copyright_license=_cell(row, "copyright_license") or "unknown",
                    attribution=_cell(row, "attribution") or "unknown",
                    mask_path=masks.pop(isic_id, None),
                    artifact_path=artifacts.get(isic_id),
                    extra=extra,
                )
            )
    if absent:
        raise StdaError(
            f"{meta}: {len(absent)} image file(s) not found in {root / 'images'}: {first_few(absent, 50)}; "
            "re-run the fetch or import (they resume) or remove those rows"
        )
    for isic_id in sorted(set(files) - seen):
        left_out[str(files[isic_id])] = f"no row in {meta.name}"
    for isic_id, path in masks.items():
        left_out[str(path)] = f"a mask for {isic_id}, which is not an image of {meta.name}"
    return images


def _cell(row: Mapping[str, str | None], column: str) -> str:
    """The stripped value of an optional column; absent or empty is ``""`` (unknown)."""
    return (row.get(column) or "").strip()


def _index_masks(folder: Path, left_out: dict[str, str]) -> dict[str, Path]:
    """Map image id -> mask file inside ``folder``, named ``<id>.png`` or ``<id>_segmentation.png`` (any case).

    A file that is no image, or a second mask for one id, goes into ``left_out`` with the reason.
    """
    if not folder.is_dir():
        return {}
    masks: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        reason = why_not_an_image(p)
        isic_id = MASK_SUFFIX.sub("", p.stem)
        if reason is None and isic_id in masks:
            reason = f"a second mask for {isic_id} (the first is {masks[isic_id].name})"
        if reason is not None:
            left_out[str(p)] = reason
            continue
        masks[isic_id] = p
    return masks


def _class_folders(root: Path) -> list[tuple[str, Path]]:
    """``(label, folder)`` for each sub-folder of ``root`` named like a class, in any case (``Malignant/``)."""
    return [(p.name.lower(), p) for p in sorted(root.iterdir()) if p.is_dir() and p.name.lower() in LABELS]


def _read_imagefolder(root: Path, left_out: dict[str, str]) -> list[RealImage]:
    images, seen = [], {}
    classes = _class_folders(root)
    for p in sorted(root.iterdir()):
        if p.is_dir() and p not in {folder for _, folder in classes}:
            left_out[str(p)] = f"not a class folder ({', '.join(LABELS)}, in any case)"
        elif p.is_file() and why_not_an_image(p) is None:
            left_out[str(p)] = f"an image outside the class folders ({', '.join(LABELS)})"
    for label, folder in classes:
        for stem, path in _index_files(folder, left_out).items():
            check_id(stem, str(path))
            if stem in seen:
                raise StdaError(f"duplicate image id {stem!r}: {seen[stem]} and {path}; rename one of them")
            seen[stem] = path
            images.append(
                RealImage(
                    isic_id=stem,
                    path=path,
                    label=label,
                    diagnosis_1=label.capitalize(),
                    lesion_id="",
                    patient_id="",
                    image_type="unknown",
                    copyright_license="unknown",
                    attribution="unknown",
                )
            )
    return images


def small_classes(per_split: Mapping[str, Mapping[str, int]], minimum: int) -> list[str]:
    """One line per validation/test class with fewer than ``minimum`` images (what split and inspect flag)."""
    return [
        f"{split} holds {n} {label} image(s), fewer than {minimum}"
        for split in ("validation", "test")
        for label in LABELS
        if (n := per_split.get(split, {}).get(label, 0)) < minimum
    ]
