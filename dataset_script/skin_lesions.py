"""The stda/skin-lesions builder: the schema, and examples streamed from a real folder and a synthetic folder.

``stda package`` instantiates :class:`SkinLesions` directly (datasets 5 no longer runs loading scripts), takes
``_info().features`` and streams ``_split_generators`` / ``_generate_examples`` into Parquet shards, so the
published repository is plain Parquet that ``load_dataset("stda/skin-lesions")`` reads with no remote code.
The builder also works locally with ``download_and_prepare``.

Reading the sources enforces the project's data rules: validation and test hold real images only; synthetic
images derive from training images of this very real folder (content and style, checked against
``splits.csv`` and the ``source.json`` the generator wrote); no lesion or patient sits on both sides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import datasets

from stda_hf import DATASET_SPLITS, LABELS
from stda_hf.core.errors import StdaError
from stda_hf.core.statefile import Fields, image_digest_problem, read_json, read_labels, read_manifest
from stda_hf.core.utils import first_few, sha256_file
from stda_hf.data.licenses import most_restrictive
from stda_hf.data.real import (
    SPLITS,
    RealFolder,
    RealImage,
    check_leakage,
    read_real_folder,
    untrained_sources,
)

logger = logging.getLogger(__name__)

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(LABELS)),
        "origin": datasets.Value("string"),  # "real" | "synthetic"
        "isic_id": datasets.Value("string"),  # ISIC id, or the synthetic id (syn_<16 hex>)
        "content_isic_id": datasets.Value("string"),  # synthetic: the benign content image; "" for real
        "style_isic_id": datasets.Value("string"),  # synthetic: the malignant style image; "" for real
        "pseudo_label_confidence": datasets.Value("float32"),  # teacher's max probability; 1.0 for real
        "pseudo_label_teacher": datasets.Value("string"),  # teacher id; "" for real
        "lesion_id": datasets.Value("string"),
        "patient_id": datasets.Value("string"),
        "copyright_license": datasets.Value("string"),
        "attribution": datasets.Value("string"),
        "mask": datasets.Image(),  # binary lesion mask (0/255); null when unknown
        "artifact_mask": datasets.Image(),  # artifact label map (0 none, 1 ruler, 2 patch, 3 ink, 4 dark corners)
        "skin_type": datasets.Value("string"),  # Fitzpatrick skin type (I..VI); null when unknown
        "age_approx": datasets.Value("int32"),  # ISIC's approximate age (5-year steps); null when unknown
        "sex": datasets.Value("string"),  # ISIC's sex field; null when unknown
        "anatom_site_general": datasets.Value("string"),  # ISIC's body site; null when unknown
    }
)
"""The schema of every split. Class ids follow :data:`stda_hf.LABELS` (0 benign, 1 malignant). The subgroup
columns (``skin_type`` .. ``anatom_site_general``) are always there, null where the metadata has no value, so
every split and every build share one schema; synthetic rows carry their content image's values."""

SUBGROUP_COLUMNS = ("skin_type", "age_approx", "sex", "anatom_site_general")
"""Per-image subgroup columns, read from ``metadata.csv`` (``fitzpatrick_skin_type`` counts as ``skin_type``)."""


def subgroups(im: RealImage) -> dict[str, str | int | None]:
    """The subgroup values of a real image from its extra metadata columns (None where unknown)."""
    extra = {k: (v or "").strip() for k, v in im.extra.items()}
    age = extra.get("age_approx", "")
    try:
        age_value = int(float(age)) if age else None
    except ValueError:
        age_value = None  # a free-text age is not a number we can group by
    return {
        "skin_type": extra.get("skin_type") or extra.get("fitzpatrick_skin_type") or None,
        "age_approx": age_value,
        "sex": extra.get("sex") or None,
        "anatom_site_general": extra.get("anatom_site_general") or None,
    }


SPLIT_ORDER = DATASET_SPLITS
"""Splits in the order they are written and listed; ``synthetic`` only when a synthetic folder is given."""

HOMEPAGE = "https://huggingface.co/datasets/stda/skin-lesions"

CITATION = """\
@misc{mikolajczyk_stda,
  title  = {Improving generalization via style transfer-based data augmentation},
  author = {Miko{\\l}ajczyk, Agnieszka and Grochowski, Micha{\\l} and Kwasigroch, Arkadiusz},
  note   = {Venue details not verified by stda-hf; code: https://github.com/agamiko/neural-based-data-augmentation}
}

@inproceedings{mikolajczyk2019style,
  title     = {Style transfer-based image synthesis as an efficient regularization technique in deep learning},
  author    = {Miko{\\l}ajczyk, Agnieszka and Grochowski, Micha{\\l}},
  booktitle = {2019 24th International Conference on Methods and Models in Automation and Robotics (MMAR)},
  publisher = {IEEE},
  year      = {2019},
  isbn      = {978-1-7281-0933-6}
}

@misc{isic_archive,
  title        = {{ISIC} Archive},
  author       = {{International Skin Imaging Collaboration}},
  howpublished = {\\url{https://www.isic-archive.com}}
}
"""

DESCRIPTION = (
    "Dermoscopic skin-lesion images labelled benign or malignant, with synthetic images made by neural style "
    "transfer (benign content, malignant style) and pseudo-labelled by a CNN trained on real training images. "
    "Validation and test hold real images only."
)


@dataclass(frozen=True)
class SyntheticImage:
    """One finished, pseudo-labelled synthetic image and the two real training images it derives from."""

    id: str
    path: Path
    content: RealImage
    style: RealImage
    label: str
    confidence: float
    teacher: str


@dataclass
class Sources:
    """The checked inputs of a build: the real folder, its split assignment, and the synthetic images."""

    real: RealFolder
    synthetic: list[SyntheticImage]
    has_synthetic: bool

    def split_names(self) -> list[str]:
        """The splits this build has, in :data:`SPLIT_ORDER`."""
        return [s for s in SPLIT_ORDER if s != "synthetic" or self.has_synthetic]


def load_sources(real_dir: str | Path, synthetic_dir: str | Path | None = None) -> Sources:
    """Read and check the real folder (with ``splits.csv``) and, when given, the synthetic folder.

    Raises
    ------
    StdaError
        Missing splits, leakage, a synthetic folder without pseudo-labels, or synthetic images that do not
        derive from training images of ``real_dir``; the message names the offending ids and what to do.
    """
    real = read_real_folder(real_dir)
    assignment = real.splits()  # refuses a missing or leaking splits.csv
    synthetic = read_synthetic(Path(synthetic_dir), real, assignment) if synthetic_dir is not None else []
    held_out = [im for split in ("validation", "test") for im in real.subset(split)]
    train_side = real.subset("train") + [im for s in synthetic for im in (s.content, s.style)]
    check_leakage(train_side, held_out)
    return Sources(real=real, synthetic=synthetic, has_synthetic=synthetic_dir is not None)


def read_synthetic(root: Path, real: RealFolder, assignment: dict[str, str]) -> list[SyntheticImage]:
    """The labelled synthetic images of ``root``, sorted by id, checked to derive from train images of ``real``.

    Raises
    ------
    StdaError
        Missing folder, manifest or ``labels.jsonl`` (run ``stda label`` first), unlabelled or unknown ids,
        images whose content or style is not a training image of ``real``, or a ``source.json`` that names
        another ``splits.csv``.
    """
    if not (root / "manifest.jsonl").is_file():
        raise StdaError(
            f"{root} is not a synthetic folder (no manifest.jsonl); create it with `stda generate`"
        )
    if not (root / "labels.jsonl").is_file():
        raise StdaError(
            f"{root} has no labels.jsonl: its images have no pseudo-labels yet; run `stda label {root}` first"
        )
    manifest = _read_manifest(root)
    labels = _read_labels(root, manifest)
    _check_provenance(manifest, real, assignment)
    _check_source_json(root, real)
    return [_synthetic_image(root, rec, labels[i], real) for i, rec in manifest.items() if i in labels]


def verdict_of(record: dict) -> str:
    """The quality gate's verdict of a manifest line (``ok`` for lines written before the gate existed)."""
    return (record.get("quality") or {}).get("verdict", "ok")


def _read_manifest(root: Path) -> dict[str, dict]:
    path = root / "manifest.jsonl"
    records = {rec["id"]: rec for rec in read_manifest(path)}  # schema-checked, ids unique
    if not records:
        raise StdaError(f"{path} lists no finished images; run `stda generate` first")
    unbound = sum("sha256" not in rec for rec in records.values())
    if unbound:
        logger.warning(
            "%d record(s) of %s carry no image digest (written before generate recorded one): their files are "
            "packaged unchecked; re-generate into a new folder to bind every image to its record",
            unbound,
            path,
        )
    return dict(sorted(records.items()))


def _read_labels(root: Path, manifest: dict[str, dict]) -> dict[str, dict]:
    """``{id: label record}``; an image without a label is an error unless it failed generate's quality gate.

    ``stda label`` leaves images whose verdict is not ``ok`` out by default, so those simply stay out of the
    dataset; an image that passed the gate (or predates it) must have a label.
    """
    path = root / "labels.jsonl"
    labels = {rec["id"]: rec for rec in read_labels(path)}  # schema-checked, one label per id
    unlabelled = sorted(i for i in set(manifest) - set(labels) if verdict_of(manifest[i]) == "ok")
    if unlabelled:
        raise StdaError(
            f"{len(unlabelled)} synthetic image(s) in {root} have no pseudo-label (e.g. {first_few(unlabelled)}); "
            f"run `stda label {root}` to finish labelling"
        )
    unknown = sorted(str(i) for i in set(labels) - set(manifest))
    if unknown:
        raise StdaError(f"{path} labels id(s) {first_few(unknown)} that manifest.jsonl does not list")
    for image_id, rec in labels.items():
        if rec.get("label") not in LABELS:
            raise StdaError(f"{path}: label {rec.get('label')!r} of {image_id}; valid labels: {list(LABELS)}")
        conf = rec.get("confidence")
        if not isinstance(conf, (int, float)) or not math.isfinite(conf) or not 0.0 <= conf <= 1.0:
            raise StdaError(f"{path}: confidence {conf!r} of {image_id} is not a probability in [0, 1]")
    return labels


def _check_provenance(manifest: dict[str, dict], real: RealFolder, assignment: dict[str, str]) -> None:
    bad = untrained_sources(manifest.values(), real, assignment)
    if bad:
        raise StdaError(
            f"{len(bad)} synthetic image source(s) are not training images of {real.root}: {first_few(bad)}; "
            "synthetic images may derive from train images only: re-run `stda generate` on this folder"
        )


def _check_source_json(root: Path, real: RealFolder) -> None:
    path = root / "source.json"
    if not path.is_file():
        raise StdaError(
            f"{path} not found: nothing records which splits.csv these images were made from; "
            "re-run `stda generate`"
        )
    fields = Fields(required={"splits_sha256": str})
    recorded = read_json(path, fields, recover="re-run `stda generate`, which writes it")["splits_sha256"]
    actual = sha256_file(real.splits_path)
    if recorded != actual:
        raise StdaError(
            f"{root} was generated from a splits.csv with sha256 {recorded}, but {real.splits_path} now has "
            f"sha256 {actual}: the splits changed since; re-run `stda generate` (and `stda label`)"
        )


def _synthetic_image(root: Path, rec: dict, label: dict, real: RealFolder) -> SyntheticImage:
    path = (root / rec["file"]).resolve()
    if not path.is_relative_to(root.resolve()):
        raise StdaError(f"{root / 'manifest.jsonl'}: file {rec['file']!r} of {rec['id']} is outside {root}")
    problem = image_digest_problem(root, rec)
    if problem:
        raise StdaError(
            f"{problem}; re-run `stda generate` on {root} after deleting that image and its manifest line"
        )
    return SyntheticImage(
        id=rec["id"],
        path=path,
        content=real[rec["content_id"]],
        style=real[rec["style_id"]],
        label=label["label"],
        confidence=float(label["confidence"]),
        teacher=str(label.get("teacher") or "unknown"),
    )


def real_example(im: RealImage) -> dict:
    """The example of a real image; images are file paths (``stda package`` embeds their bytes)."""
    return {
        "image": str(im.path),
        "label": im.label,
        "origin": "real",
        "isic_id": im.isic_id,
        "content_isic_id": "",
        "style_isic_id": "",
        "pseudo_label_confidence": 1.0,
        "pseudo_label_teacher": "",
        "lesion_id": im.lesion_id,
        "patient_id": im.patient_id,
        "copyright_license": im.copyright_license,
        "attribution": im.attribution,
        "mask": str(im.mask_path) if im.mask_path else None,
        "artifact_mask": str(im.artifact_path) if im.artifact_path else None,
        **subgroups(im),
    }


def synthetic_example(syn: SyntheticImage) -> dict:
    """The example of a synthetic image: provenance of both sources, the most restrictive of their licences."""
    content, style = syn.content, syn.style
    return {
        "image": str(syn.path),
        "label": syn.label,
        "origin": "synthetic",
        "isic_id": syn.id,
        "content_isic_id": content.isic_id,
        "style_isic_id": style.isic_id,
        "pseudo_label_confidence": syn.confidence,
        "pseudo_label_teacher": syn.teacher,
        "lesion_id": content.lesion_id,
        "patient_id": content.patient_id,
        "copyright_license": most_restrictive([content.copyright_license, style.copyright_license]).isic_name,
        "attribution": (
            f"Synthetic image (stda-hf neural style transfer) derived from {content.isic_id} (content; "
            f"{content.attribution}; {content.copyright_license}) and {style.isic_id} (style; "
            f"{style.attribution}; {style.copyright_license})"
        ),
        "mask": None,  # the content's mask does not hold exactly after restyling: unknown
        "artifact_mask": None,
        **subgroups(content),  # the depicted lesion's patient
    }


def split_examples(sources: Sources, split: str) -> Iterator[tuple[str, dict]]:
    """``(id, example)`` for every image of ``split``, in id order: what the builder yields, and what
    ``stda package`` streams into Parquet without instantiating the builder.

    Raises
    ------
    StdaError
        For a split this dataset does not have.
    """
    if split == "synthetic":
        for syn in sources.synthetic:
            yield syn.id, synthetic_example(syn)
        return
    if split not in SPLITS:
        raise StdaError(f"unknown split {split!r}; valid splits: {list(SPLIT_ORDER)}")
    for im in sources.real.subset(split):
        yield im.isic_id, real_example(im)


@dataclass
class SkinLesionsConfig(datasets.BuilderConfig):
    """Where the builder reads from."""

    real_dir: str | None = None  # real-image folder with metadata.csv, images/ and splits.csv
    synthetic_dir: str | None = None  # synthetic folder with manifest.jsonl and labels.jsonl; None: real only


class SkinLesions(datasets.GeneratorBasedBuilder):
    """Benign and malignant skin lesions, real and style-transfer synthetic, with full provenance."""

    BUILDER_CONFIG_CLASS = SkinLesionsConfig
    BUILDER_CONFIGS: ClassVar[list[SkinLesionsConfig]] = [
        SkinLesionsConfig(name="default", description="real splits plus the synthetic split")
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=DESCRIPTION, features=FEATURES, homepage=HOMEPAGE, citation=CITATION
        )

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        if not self.config.real_dir:
            raise StdaError("the skin_lesions builder needs real_dir=<real-image folder>")
        sources = load_sources(self.config.real_dir, self.config.synthetic_dir)
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"split": split, "sources": sources})
            for split in sources.split_names()
        ]

    def _generate_examples(self, split: str, sources: Sources) -> Iterator[tuple[str, dict]]:
        yield from split_examples(sources, split)
