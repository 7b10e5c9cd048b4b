"""``stda import``: real dermoscopy folders as researchers download them, turned into the real-image layout.

Sources read directly (the exact layouts are in ``docs/data.md``):

* an ISIC challenge folder, 2016 to 2020: images, the ground-truth CSV(s) of the classification task, optional
  masks named ``<id>_segmentation.png`` (or ``_Segmentation``), and the side tables that carry lesion ids and
  subgroups (2017 ``*_Data_metadata.csv``, 2018 ``LesionGroupings``, 2019 ``Training_Metadata``);
* an ISIC Archive export by isic-cli (``metadata.csv`` beside the images), whose per-image licence and
  attribution are kept;
* HAM10000: ``HAM10000_metadata`` (``.csv``, Dataverse ``.tab`` or no extension, delimiter sniffed) with its
  image folders and optionally the ``HAM10000_segmentations_lesion_tschandl`` masks.

Each source's diagnosis codes are mapped to ``Benign``/``Malignant``/``Indeterminate`` by a map that is printed
and can be overridden per code; the raw code stays in the ``dx`` column. Every source file the import does not
use is listed with the reason (:attr:`ImportSummary.left_out`), every ground-truth row without an image is
named, and every image keeps its id, licence and attribution.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from stda_hf.core.config import changed_settings, config_to_dict, describe_changes, dump_config, read_settings
from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.fileio import atomic_write, make_dir, read_text, write_json
from stda_hf.core.utils import first_few, progress
from stda_hf.data.images import bounded_size, load_image, save_image, why_not_an_image
from stda_hf.data.licenses import LICENSES, write_attribution
from stda_hf.data.real import MASK_SUFFIX, check_id, write_metadata

logger = logging.getLogger(__name__)

B, M, I = "Benign", "Malignant", "Indeterminate"  # noqa: E741

SOURCES = ("isic2016", "isic2017", "isic2018", "isic2019", "isic2020", "archive", "ham10000")
"""What ``--kind`` accepts besides ``auto``."""

_HAM = {"mel": M, "bcc": M, "akiec": M, "nv": B, "bkl": B, "df": B, "vasc": B}
DX_MAPS: dict[str, dict[str, str]] = {
    "isic2016": {"benign": B, "malignant": M, "0": B, "1": M},
    "isic2017": {"melanoma": M, "seborrheic_keratosis": B, "nevus": B},
    "isic2018": dict(_HAM),
    "isic2019": {"mel": M, "bcc": M, "scc": M, "nv": B, "bkl": B, "df": B, "vasc": B, "ak": I, "unk": I},
    "isic2020": {"benign": B, "malignant": M},
    "archive": {"benign": B, "malignant": M, "indeterminate": I, "indeterminate/benign": I,
                "indeterminate/malignant": I},
    "ham10000": dict(_HAM),
}  # fmt: skip
"""Diagnosis code (lower case) -> ``diagnosis_1`` per source. ``akiec`` (actinic keratosis with Bowen's disease)
is malignant as in most published binary HAM10000 work; 2019's ``AK`` alone is Indeterminate as in ISIC's own
diagnosis tree. Override any code with ``--dx-map akiec=indeterminate``."""

_HAM_ATTRIBUTION = (
    "HAM10000 Dataset: (c) by ViDIR Group, Department of Dermatology, Medical University of Vienna; "
    "https://doi.org/10.1038/sdata.2018.161"
)
_MSK_ATTRIBUTION = (
    "MSK Dataset: (c) Anonymous; https://arxiv.org/abs/1710.05006 ; https://arxiv.org/abs/1902.03368"
)
DEFAULT_TERMS: dict[str, tuple[str, str, str]] = {
    "isic2016": (
        "CC-0",
        "ISIC 2016 challenge (ISBI 2016), International Skin Imaging Collaboration; "
        "Gutman et al., https://arxiv.org/abs/1605.01397",
        "ISIC 2016 challenge",
    ),
    "isic2017": (
        "CC-0",
        "ISIC 2017 challenge (ISBI 2017), International Skin Imaging Collaboration; "
        "Codella et al., https://arxiv.org/abs/1710.05006",
        "ISIC 2017 challenge",
    ),
    "isic2018": ("CC-BY-NC", f"{_HAM_ATTRIBUTION}; {_MSK_ATTRIBUTION}", "ISIC 2018 challenge, task 3"),
    "isic2019": (
        "CC-BY-NC",
        "BCN_20000 Dataset: (c) Department of Dermatology, Hospital Clinic de Barcelona; "
        f"{_HAM_ATTRIBUTION}; {_MSK_ATTRIBUTION}",
        "ISIC 2019 challenge",
    ),
    "isic2020": (
        "CC-BY-NC",
        "International Skin Imaging Collaboration. SIIM-ISIC 2020 Challenge Dataset. "
        "https://doi.org/10.34970/2020-ds01 (2020)",
        "SIIM-ISIC 2020 challenge",
    ),
    "archive": ("", "", "ISIC Archive export"),  # per image, from the export's own columns
    "ham10000": ("CC-BY-NC", _HAM_ATTRIBUTION, "HAM10000"),
}
"""Source -> (licence, attribution, title): the licence the challenge's data page states for its images (ISIC
2016 and 2017: CC-0; 2018 task 3, 2019, 2020 and HAM10000: CC-BY-NC) and the attribution it asks for."""

_COMPANIONS = (
    (re.compile(r"_superpixels$", re.IGNORECASE), "a superpixel map (ISIC 2017 task 2), not an image"),
)
_NOTICES = {"attribution.txt", "license.txt", "licenses.txt"}


@dataclass
class ImportConfig:
    """Settings of ``stda import``."""

    kind: str = "auto"  # auto, isic2016, isic2017, isic2018, isic2019, isic2020, archive or ham10000
    labels: str = ""  # the ground-truth or metadata table to read (default: every one found in the folder)
    license: str = ""  # licence of every image, e.g. CC-BY (default: the source's; archive: each image's own)
    attribution: str = ""  # attribution of every image (default: the source's citation)
    dx_map: str = ""  # diagnosis map overrides, CODE=benign|malignant|indeterminate, comma-separated
    max_side: int = 0  # longest stored side in pixels; larger images are resized (0: copy the originals)
    skip_missing: bool = False  # import the rest when ground-truth rows have no image (they are listed)

    def __post_init__(self) -> None:
        if self.kind not in ("auto", *SOURCES):
            raise StdaError(f"--kind {self.kind!r} is not known; valid: {['auto', *SOURCES]}")
        if self.max_side and not 16 <= self.max_side <= 16384:
            raise StdaError(f"--max-side {self.max_side} must be 0 (keep) or 16 to 16384 pixels")
        if self.license and self.license not in LICENSES and self.license != "unknown":
            raise StdaError(f"--license {self.license!r} is not known; valid: {[*LICENSES, 'unknown']}")
        parse_dx_map(self.dx_map)


def parse_dx_map(text: str) -> dict[str, str]:
    """``"akiec=indeterminate,nv=benign"`` -> ``{"akiec": "Indeterminate", "nv": "Benign"}``.

    Raises
    ------
    StdaError
        A part that is not ``CODE=CLASS`` or a class other than benign, malignant, indeterminate.
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        code, sep, value = part.partition("=")
        if not sep or not code.strip() or value.strip().capitalize() not in (B, M, I):
            raise StdaError(
                f"--dx-map {part!r}: give CODE=CLASS with CLASS benign, malignant or indeterminate "
                "(e.g. akiec=indeterminate)"
            )
        out[code.strip().lower()] = value.strip().capitalize()
    return out


@dataclass
class Table:
    """One table of a source: its path, what it holds (``labels`` or ``side``), its format and rows."""

    path: Path
    kind: str  # "labels" (ground truth) or "side" (lesion ids, subgroups, duplicates)
    source: str  # one of SOURCES
    rows: list[dict[str, str]]


@dataclass
class ImportSummary:
    """What ``stda import`` wrote and everything of the source it did not use."""

    out: Path
    source: str  # the format read
    tables: list[str]  # the tables read
    per_diagnosis: dict[str, int]  # diagnosis_1 -> images
    per_code: dict[str, int]  # raw diagnosis code -> images
    dx_map: dict[str, str]  # the map applied (source default with overrides)
    license: str  # licence given to every image ("per image" for an archive export)
    attribution: str
    masks: int  # masks matched and written
    resized: int  # images stored smaller because of --max-side
    missing: list[str] = field(
        default_factory=list
    )  # ground-truth rows without an image (with --skip-missing)
    left_out: dict[str, str] = field(default_factory=dict)  # source file -> why it was not used

    def format(self) -> str:
        """The lines ``stda import`` prints."""
        n = sum(self.per_diagnosis.values())
        lines = [f"imported {n} images ({self.source}) to {self.out}"]
        lines.append("  read:        " + ", ".join(self.tables))
        lines.append("  diagnosis:   " + ", ".join(f"{k} {v}" for k, v in self.per_diagnosis.items()))
        lines.append("  dx map:      " + ", ".join(f"{k}->{v.lower()}" for k, v in self.dx_map.items()))
        lines.append("  codes seen:  " + ", ".join(f"{k} {v}" for k, v in self.per_code.items()))
        lines.append(f"  licence:     {self.license}; attribution: {self.attribution}")
        lines.append(f"  masks:       {self.masks}")
        if self.resized:
            lines.append(f"  resized:     {self.resized} image(s) to the --max-side bound")
        if self.missing:
            lines.append(f"  missing:     {len(self.missing)} ground-truth row(s) without an image:")
            lines += [f"    {m}" for m in self.missing]
        lines.append(f"  left out:    {len(self.left_out)} file(s) of the source")
        lines += [f"    {path}: {reason}" for path, reason in sorted(self.left_out.items())]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Reading tables


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV or tab-separated table (delimiter sniffed: Dataverse serves ``.tab``)."""
    text = read_text(path).lstrip("\ufeff")
    first = text.split("\n", 1)[0]
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        return [], []
    return [c.strip().strip('"') for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]


_ISIC_ID = re.compile(r"^ISIC_\d+")


def classify_table(path: Path) -> tuple[str, str] | None:
    """``(kind, source)`` of a table by its header, or None when it is none of the known tables.

    Raises
    ------
    StdaError
        The table cannot be read as text (not UTF-8, unreadable).
    """
    header, _ = read_table(path)
    cols = {c.lower() for c in header}
    if {"image_id", "dx", "lesion_id"} <= cols:
        return "labels", "ham10000"
    if "isic_id" in cols and cols & {"diagnosis_1", "benign_malignant"}:
        return "labels", "archive"
    if {"image_id", "melanoma", "seborrheic_keratosis"} <= cols:
        return "labels", "isic2017"
    if {"image_id", "age_approximate"} <= cols:
        return "side", "isic2017"
    if {"image", "mel", "nv", "akiec"} <= cols:
        return "labels", "isic2018"
    if {"image", "mel", "nv", "scc"} <= cols:
        return "labels", "isic2019"
    if {"image", "lesion_id"} <= cols:
        return "side", "isic2019" if "age_approx" in cols else "isic2018"
    if "image_name" in cols and cols & {"benign_malignant", "target"}:
        return "labels", "isic2020"
    if {"image_name_1", "image_name_2"} <= cols:
        return "side", "isic2020"
    if len(header) == 2 and _ISIC_ID.match(header[0]):  # 2016 ground truth: no header row
        return "labels", "isic2016"
    return None


def _is_table(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tab") or (path.suffix == "" and "metadata" in path.name.lower())


def _partition(path: Path) -> str:
    """The challenge's own split named in a table's file name (``Training``, ``Validation``, ``Test``), or ''."""
    found = re.search(r"(training|validation|test)", path.name, re.IGNORECASE)
    return found.group(1).capitalize() if found else ""


def _as_records(path: Path, source: str) -> list[dict[str, str]]:
    header, rows = read_table(path)
    if source == "isic2016":
        rows, header = [header, *rows], ["image_id", "label"]
    keys = [h.lower() for h in header]
    return [dict(zip(keys, r + [""] * (len(keys) - len(r)), strict=False)) for r in rows]  # short rows: empty


def _code_2016(value: str) -> str:
    v = value.strip().lower()
    try:
        return str(int(float(v)))
    except ValueError:
        return v


def _flag(value: str, where: str, column: str) -> bool:
    """A 0/1 ground-truth cell (``1``, ``1.0``, ``0.0``, empty) as a bool; anything else is refused."""
    try:
        return float(value or 0) >= 0.5
    except ValueError:
        raise StdaError(f"{where}: column {column} holds {value!r}; expected 0 or 1") from None


def _one_hot(rec: dict[str, str], codes: Iterable[str], where: str) -> str:
    hot = [c for c in codes if c in rec and _flag(rec[c], where, c.upper())]
    if len(hot) != 1:
        raise StdaError(f"{where}: expected exactly one diagnosis column set to 1, found {hot or 'none'}")
    return hot[0]


_ONE_HOT = {
    "isic2018": ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"),
    "isic2019": ("mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc", "unk"),
}


def _label_row(rec: dict[str, str], source: str, where: str) -> dict[str, str]:
    """One ground-truth record -> ``{isic_id, dx, ...provenance}`` (diagnosis_1 is added by the map)."""
    if source == "isic2016":
        return {"isic_id": rec["image_id"], "dx": _code_2016(rec["label"])}
    if source == "isic2017":
        mel, sk = (_flag(rec.get(c, ""), where, c) for c in ("melanoma", "seborrheic_keratosis"))
        dx = "melanoma" if mel else "seborrheic_keratosis" if sk else "nevus"
        return {"isic_id": rec["image_id"], "dx": dx}
    if source in _ONE_HOT:
        return {"isic_id": rec["image"], "dx": _one_hot(rec, _ONE_HOT[source], where)}
    if source == "isic2020":
        bm = (rec.get("benign_malignant") or "").lower()
        dx = bm or {"0": "benign", "1": "malignant"}.get(_code_2016(rec.get("target", "")), "")
        row = {"isic_id": rec["image_name"], "dx": dx, "diagnosis": rec.get("diagnosis", "")}
        row |= {"patient_id": rec.get("patient_id", ""), "lesion_id": rec.get("lesion_id", "")}
        row |= {"sex": rec.get("sex", ""), "age_approx": rec.get("age_approx", "")}
        return row | {"anatom_site_general": rec.get("anatom_site_general_challenge", "")}
    if source == "ham10000":
        row = {"isic_id": rec["image_id"], "dx": rec["dx"].lower(), "lesion_id": rec["lesion_id"]}
        row |= {
            "dx_type": rec.get("dx_type", ""),
            "age_approx": rec.get("age", ""),
            "sex": rec.get("sex", ""),
        }
        row |= {"anatom_site_general": rec.get("localization", "")}
        return row | ({"dataset": rec["dataset"]} if "dataset" in rec else {})
    # archive: isic-cli's metadata.csv, every column kept
    dx = (rec.get("diagnosis_1") or rec.get("benign_malignant") or "").lower()
    return {**{k: v for k, v in rec.items() if k != "diagnosis_1"}, "isic_id": rec["isic_id"], "dx": dx}


def _side_row(rec: dict[str, str], source: str) -> tuple[str, dict[str, str]]:
    """A side-table record -> ``(image id, columns to add)``."""
    if source == "isic2017":
        out = {"age_approx": rec.get("age_approximate", ""), "sex": rec.get("sex", "")}
        return rec["image_id"], out
    if source == "isic2020":  # ISIC_2020_Training_Duplicates.csv: `stda split` keeps each pair in one group
        return rec.get("image_name_2", ""), {"duplicate_of": rec.get("image_name_1", "")}
    out = {"lesion_id": rec.get("lesion_id", "")}
    if source == "isic2019":
        out |= {"age_approx": rec.get("age_approx", ""), "sex": rec.get("sex") or rec.get("gender", "")}
        out |= {"anatom_site_general": rec.get("anatom_site_general", "")}
    else:
        out |= {"dx_type": rec.get("diagnosis_confirm_type", "")} if "diagnosis_confirm_type" in rec else {}
    return rec["image"], out


# ----------------------------------------------------------------------------------------------------------------
# Finding files


def find_tables(source_dir: Path, cfg: ImportConfig) -> tuple[str, list[Table]]:
    """The source format and its tables (ground truth first), found by header.

    Raises
    ------
    StdaError
        No ground-truth table, tables of two sources in one folder, or a ``--labels`` file of unknown form.
    """
    candidates = (
        [Path(cfg.labels)] if cfg.labels else sorted(p for p in source_dir.rglob("*") if _is_table(p))
    )
    if cfg.labels and not candidates[0].is_file():
        raise StdaError(f"--labels {cfg.labels} not found")
    if cfg.labels:  # side tables still come from the source folder
        candidates += sorted(p for p in source_dir.rglob("*") if _is_table(p) and p != candidates[0])
    found, unreadable = [], []
    for p in (p for p in candidates if p.is_file()):
        try:
            found.append((p, classify_table(p)))
        except StdaError as err:
            unreadable.append(str(err))
    label_sources = {
        c[1] for p, c in found if c and c[0] == "labels" and (not cfg.labels or p == candidates[0])
    }
    if cfg.kind != "auto":
        label_sources &= {cfg.kind}
    if not label_sources:
        what = f"--labels {cfg.labels}" if cfg.labels else f"{source_dir}"
        raise StdaError(
            f"{what}: no ground-truth table of {cfg.kind if cfg.kind != 'auto' else 'a known source'} found; "
            f"known: ISIC 2016-2020 challenge CSVs, isic-cli's metadata.csv, HAM10000_metadata (see docs/data.md)"
            + (f"; tables that could not be read: {first_few(unreadable, 3)}" if unreadable else "")
        )
    if len(label_sources) > 1:
        raise StdaError(
            f"{source_dir} holds ground truth of {sorted(label_sources)}; import one at a time with --kind "
            "or --labels"
        )
    source = label_sources.pop()
    tables = []
    for p, c in found:
        if c and c[1] == source and (c[0] != "labels" or not cfg.labels or p == candidates[0]):
            tables.append(Table(p, c[0], source, _as_records(p, source)))
    tables.sort(key=lambda t: (t.kind != "labels", str(t.path)))
    return source, tables


def index_source_files(
    source_dir: Path, used: set[Path]
) -> tuple[dict[str, Path], dict[str, Path], dict[str, str]]:
    """Images by id, masks by image id, and every other file with why it is not used.

    A mask is ``<id>_segmentation.<ext>`` (any case) anywhere, or ``<id>.<ext>`` inside a folder named
    ``masks``. A second file for one image id keeps the first in path order and lists the other.
    """
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    left_out: dict[str, str] = {}
    for p in sorted(source_dir.rglob("*")):
        if p.is_dir() or p in used:
            continue
        if p.name.lower() in _NOTICES:
            left_out[str(p)] = "the source's licence notice (its terms are recorded per image)"
            continue
        companion = next((why for pat, why in _COMPANIONS if pat.search(p.stem)), None)
        reason = companion or why_not_an_image(p)
        if reason is not None:
            left_out[str(p)] = (
                reason if companion or not _is_table(p) else "a table this import does not read"
            )
            continue
        is_mask = bool(MASK_SUFFIX.search(p.stem)) or p.parent.name.lower() == "masks"
        index, isic_id = (masks, MASK_SUFFIX.sub("", p.stem)) if is_mask else (images, p.stem)
        if isic_id in index:
            left_out[str(p)] = (
                f"a second {'mask' if is_mask else 'image'} for {isic_id}; {index[isic_id]} is used"
            )
        else:
            index[isic_id] = p
    return images, masks, left_out


# ----------------------------------------------------------------------------------------------------------------
# The stage


def import_folder(source_dir: str | Path, out: str | Path, cfg: ImportConfig | None = None) -> ImportSummary:
    """Turn a downloaded ISIC challenge folder, isic-cli export or HAM10000 folder into a real-image folder.

    Writes ``out/images/<id>.<ext>`` (the original bytes, or resized to ``max_side``), ``out/masks/<id>.png``
    (0/255, the stored image's size), ``metadata.csv``, ``ATTRIBUTION.md`` with ``LICENSES/``, ``import.yaml``
    (the settings) and ``import_report.json`` (what was read, mapped and left out). Re-running the same
    command keeps the files already written.

    Raises
    ------
    StdaError
        Unknown source layout, an unmapped diagnosis code, ground-truth rows without an image (all named;
        ``skip_missing`` imports the rest), a bad id, or ``out`` written with other settings.
    """
    cfg = cfg or ImportConfig()
    source_dir, out = Path(source_dir), Path(out)
    if not source_dir.is_dir():
        raise StdaError(f"source folder {source_dir} does not exist")
    if out.resolve() == source_dir.resolve() or source_dir.resolve() in out.resolve().parents:
        raise StdaError(f"--out {out} lies inside the source {source_dir}; write the import elsewhere")
    source, tables = find_tables(source_dir, cfg)
    dx_map = {**DX_MAPS[source], **parse_dx_map(cfg.dx_map)}
    rows = _rows(tables, source, dx_map)
    images, masks, left_out = index_source_files(source_dir, {t.path for t in tables})
    missing = [f"{r['isic_id']} ({r['_table']})" for r in rows if r["isic_id"] not in images]
    if missing and not cfg.skip_missing:
        raise StdaError(
            f"{len(missing)} image(s) of the ground truth not found under {source_dir}: {first_few(missing, 50)}; "
            "unpack the image zips into the folder, or pass --skip-missing to import the rest"
        )
    rows = [r for r in rows if r["isic_id"] in images]
    if not rows:
        raise StdaError(f"no image of the ground truth was found under {source_dir}")
    wanted = {r["isic_id"] for r in rows}
    for isic_id in sorted(set(images) - wanted):
        left_out[str(images[isic_id])] = "an image with no ground-truth row"
    for isic_id in sorted(set(masks) - wanted):
        left_out[str(masks[isic_id])] = f"a mask for {isic_id}, which is not an imported image"
    _check_settings(out, cfg)
    make_dir(out)
    dump_config(cfg, out / "import.yaml")  # first, so an interrupted import resumes
    license_, attribution, title = _terms(source, cfg)
    resized, n_masks = _write_files(rows, images, masks, out, cfg, left_out)
    for r in rows:
        if license_ or not r.get("copyright_license"):
            r["copyright_license"] = license_ or "unknown"
        if attribution or not r.get("attribution"):
            r["attribution"] = attribution or "unknown"
        r.setdefault("image_type", "dermoscopic")
        r.pop("_table")
    write_metadata(out, rows)
    write_attribution(out, rows, title=f"Attribution: {title}")
    summary = ImportSummary(
        out=out,
        source=source,
        tables=[str(t.path) for t in tables],
        per_diagnosis=dict(sorted(Counter(r["diagnosis_1"] for r in rows).items())),
        per_code=dict(sorted(Counter(r["dx"] for r in rows).items())),
        dx_map=dx_map,
        license=license_ or "per image (the export's copyright_license)",
        attribution=attribution or "per image (the export's attribution)",
        masks=n_masks,
        resized=resized,
        missing=missing,
        left_out=dict(sorted(left_out.items())),
    )
    write_json(out / "import_report.json", {k: v for k, v in summary.__dict__.items() if k != "out"})
    logger.info("imported %d images from %s to %s", len(rows), source_dir, out)
    return summary


def _rows(tables: list[Table], source: str, dx_map: dict[str, str]) -> list[dict[str, str]]:
    """Ground-truth rows with ``diagnosis_1`` and the side tables' columns, in id order; ids checked."""
    side: dict[str, dict[str, str]] = {}
    for t in tables:
        if t.kind == "side":
            for rec in t.rows:
                isic_id, cols = _side_row(rec, source)
                side.setdefault(isic_id, {}).update({k: v for k, v in cols.items() if v})
    rows: dict[str, dict[str, str]] = {}
    for t in (t for t in tables if t.kind == "labels"):
        for line, rec in enumerate(t.rows, start=1 if source == "isic2016" else 2):
            where = f"{t.path} line {line}"
            row = _label_row(rec, source, where)
            check_id(row["isic_id"], where)
            code = row["dx"].lower()
            if code not in dx_map:
                raise StdaError(
                    f"{where}: diagnosis {row['dx']!r} of {row['isic_id']} is not in the {source} map "
                    f"{sorted(dx_map)}; add it with --dx-map {code or 'CODE'}=benign|malignant|indeterminate"
                )
            row = {**row, **side.get(row["isic_id"], {}), "diagnosis_1": dx_map[code]}
            row["_table"] = t.path.name
            if part := _partition(t.path):
                row["challenge_split"] = part
            previous = rows.get(row["isic_id"])
            if previous is not None and previous["diagnosis_1"] != row["diagnosis_1"]:
                raise StdaError(
                    f"{where}: {row['isic_id']} is {row['diagnosis_1']} here but {previous['diagnosis_1']} in "
                    f"{previous['_table']}; keep one of the tables (--labels)"
                )
            rows.setdefault(row["isic_id"], row)
    return [rows[k] for k in sorted(rows)]


def _terms(source: str, cfg: ImportConfig) -> tuple[str, str, str]:
    """Licence and attribution for every image ('' keeps each row's own) and the source's title."""
    license_, attribution, title = DEFAULT_TERMS[source]
    return cfg.license or license_, cfg.attribution or attribution, title


def _check_settings(out: Path, cfg: ImportConfig) -> None:
    saved = read_settings(out / "import.yaml")
    if saved is None:
        if out.is_dir() and any(out.iterdir()):
            raise StdaError(f"--out {out} is not empty and holds no import; choose a new folder")
        return
    changed = changed_settings(saved, config_to_dict(cfg))
    if changed:
        raise StdaError(
            f"{out} was imported with other settings ({describe_changes(saved, config_to_dict(cfg), changed)}); "
            "choose a new --out folder or delete this one"
        )


def _write_files(
    rows: list[dict[str, str]],
    images: dict[str, Path],
    masks: dict[str, Path],
    out: Path,
    cfg: ImportConfig,
    left_out: dict[str, str],
) -> tuple[int, int]:
    """Copy or resize each image and its mask into ``out``; returns (images resized, masks written)."""
    make_dir(out / "images")
    resized = n_masks = 0
    for r in progress(rows, desc="import", unit="img"):
        src = images[r["isic_id"]]
        dst = out / "images" / f"{r['isic_id']}{src.suffix.lower()}"
        size = _store_image(src, dst, cfg.max_side)
        resized += size is not None
        mask = masks.get(r["isic_id"])
        if mask is None:
            continue
        try:
            _store_mask(mask, out / "masks" / f"{r['isic_id']}.png", src, size)
            n_masks += 1
        except BadImageError as err:
            left_out[str(mask)] = err.reason
    return resized, n_masks


def _store_image(src: Path, dst: Path, max_side: int) -> tuple[int, int] | None:
    """Copy ``src`` to ``dst`` (its bytes) or, when a side exceeds ``max_side``, resize it; the new size or None."""
    with Image.open(src) as img:
        w, h = img.size
    if not max_side or max(w, h) <= max_side:
        if not dst.is_file():
            with atomic_write(dst, "wb") as fh, open(src, "rb") as fh_src:
                shutil.copyfileobj(fh_src, fh)
        return None
    size = bounded_size(w, h, max_side)
    if not dst.is_file():
        save_image(load_image(src).resize(size, Image.Resampling.LANCZOS), dst)
    return size


def _store_mask(src: Path, dst: Path, image: Path, size: tuple[int, int] | None) -> None:
    """Write a 0/255 mask of the stored image's size; a mask of another size than its image is refused."""
    mask = load_image(src).convert("L")
    with Image.open(image) as img:
        if mask.size != img.size:
            raise BadImageError(
                src, f"mask is {mask.size[0]}x{mask.size[1]} but its image is {img.width}x{img.height}"
            )
    binary = Image.fromarray((np.asarray(mask) > 127).astype(np.uint8) * 255, "L")
    if size is not None:
        binary = binary.resize(size, Image.Resampling.NEAREST)
    if not dst.is_file():
        make_dir(dst.parent)
        save_image(binary, dst)


__all__ = [
    "DEFAULT_TERMS",
    "DX_MAPS",
    "SOURCES",
    "ImportConfig",
    "ImportSummary",
    "classify_table",
    "find_tables",
    "import_folder",
    "index_source_files",
    "parse_dx_map",
    "read_table",
]
