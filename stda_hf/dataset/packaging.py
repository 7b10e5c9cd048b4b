"""Package real and synthetic images as a Hub dataset repository on disk: Parquet shards, card, attribution.

    stda package real/ --synthetic synthetic/ --out hub/skin-lesions --name stda/skin-lesions

The schema and the examples come from the ``datasets`` builder module in ``dataset_script/`` (installed as ``stda_hf.dataset_script``), through its public
functions (``FEATURES``, ``load_sources``, ``split_examples``; datasets 5 runs no loading scripts). Examples
stream through it one at a time: each image is checked with
:func:`~stda_hf.data.images.load_image`, embedded, and written into ``data/<split>-NNNNN-of-NNNNN.parquet`` in small
row groups, a shard closing at a byte or row bound, so memory stays flat however many images there are.
Finished shards are recorded in ``<out>/.stda-package/`` and an interrupted run resumes after the last one.
Output is deterministic: the same inputs give byte-identical Parquet files, card, attribution and preview.

At ~650 lines this module is one stage on purpose: encoding, the shard writer, the resume record and the card
facts all read the same :class:`ShardRecord` and staging folder, and splitting them would spread one on-disk
contract over several files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.features.features import encode_nested_example
from PIL import Image, ImageDraw, ImageOps

from stda_hf import LABELS, __version__
from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.fileio import (
    append_jsonl,
    atomic_write,
    check_separate,
    write_bytes,
    write_json,
    write_text,
)
from stda_hf.core.statefile import Fields, read_json, read_manifest, read_records, read_yaml
from stda_hf.core.utils import progress
from stda_hf.data.images import SkipReport, bound_side, load_image
from stda_hf.data.licenses import write_attribution
from stda_hf.data.real import PHANTOM_ATTRIBUTION
from stda_hf.dataset.card import CardFacts, SplitFacts, SyntheticFacts, dataset_license, render_card

logger = logging.getLogger(__name__)

STAGING = ".stda-package"
"""Folder inside ``--out`` holding finished shards and their records until the build completes."""
IMAGE_COLUMNS = ("image", "mask", "artifact_mask")
AS_IS_FORMATS = {"JPEG": ".jpg", "PNG": ".png"}
SKIN_TYPE_COLUMNS = ("skin_type", "fitzpatrick_skin_type")
EXIF_ORIENTATION = 0x0112
MIN_SIDE, MAX_SIDE = 16, 16384
"""The ``--max-side`` values accepted (as ``stda import``'s): below 16 px no classifier input is left."""
BOUNDED_JPEG_QUALITY = 95
"""JPEG quality of a real JPEG image re-encoded at ``--max-side`` (the quality ``stda generate`` saves at)."""
SCAN_COLUMNS = [
    "label",
    "origin",
    "isic_id",
    "content_isic_id",
    "style_isic_id",
    "pseudo_label_confidence",
    "pseudo_label_teacher",
    "lesion_id",
    "patient_id",
    "copyright_license",
    "attribution",
    "mask.path",
    "artifact_mask.path",
]


@dataclass
class PackageConfig:
    """Settings of ``stda package``."""

    name: str = "stda/skin-lesions"  # Hub repo id the card names (load_dataset("<name>"))
    pretty_name: str = "Skin lesions with style-transfer augmentation (ST-DA)"  # title of the dataset card
    max_shard_bytes: int = 500_000_000  # close a Parquet shard once its rows hold this many bytes
    max_shard_rows: int = 100_000  # close a Parquet shard at this many rows at the latest
    row_group_rows: int = 100  # rows per Parquet row group at most (small groups stream with little memory)
    row_group_bytes: int = 32_000_000  # bytes per row group at most (caps memory for very large images)
    preview_per_row: int = 8  # images per row of preview.png (real benign, real malignant, synthetic)
    keep_failed: bool = False  # also package synthetic images that failed generate's quality gate (left out)
    max_side: int = 0  # bound the longer side of the embedded real images and their masks, aspect kept (0: the original files as they are)

    def __post_init__(self) -> None:
        for name in ("max_shard_bytes", "max_shard_rows", "row_group_rows", "row_group_bytes"):
            if getattr(self, name) < 1:
                raise StdaError(
                    f"--{name.replace('_', '-')} {getattr(self, name)} must be a positive integer"
                )
        if self.max_side and not MIN_SIDE <= self.max_side <= MAX_SIDE:
            raise StdaError(
                f"--max-side {self.max_side} must be 0 (the originals) or {MIN_SIDE} to {MAX_SIDE} pixels"
            )
        if not 1 <= self.preview_per_row <= 32:
            raise StdaError(f"--preview-per-row {self.preview_per_row} must be between 1 and 32")
        if self.name.count("/") != 1 or not all(self.name.split("/")):
            raise StdaError(f"--name {self.name!r} must be a Hub repo id of the form <owner>/<dataset>")


@dataclass
class ShardRecord:
    """A finished shard in the staging folder (one line of ``shards.jsonl``)."""

    split: str
    index: int
    file: str  # name inside the staging folder
    rows: int
    consumed: int  # examples drawn from the builder for this shard (rows + skipped)
    num_bytes: int  # Arrow bytes of its rows
    size: int  # Parquet file size
    width_min: int
    width_max: int
    height_min: int
    height_max: int
    skipped: dict[str, str] = field(default_factory=dict)  # image path -> reason


@dataclass
class PackageResult:
    """What ``package`` wrote."""

    out: Path
    counts: dict[str, dict[str, int]]  # split -> class -> rows
    files: list[str]  # paths relative to ``out``
    license: str
    skipped: dict[str, str]  # image path -> reason
    left_out_failed: dict[str, int] = field(
        default_factory=dict
    )  # quality verdict -> synthetic images left out


# ----------------------------------------------------------------------------------------------------------------
# Encoding one example


def embed_image(path: str | Path, max_side: int = 0) -> tuple[dict, tuple[int, int]]:
    """Check that ``path`` is a usable image and return its Arrow struct and (embedded) size.

    JPEG and PNG files that are upright RGB are embedded byte for byte; anything else (other formats, modes,
    EXIF rotation) is stored as lossless PNG of the upright RGB image that :func:`load_image` yields. With
    ``max_side``, an image whose longer side exceeds it is resized (Lanczos, aspect kept:
    :func:`~stda_hf.data.images.bound_side`) and stored as JPEG (quality :data:`BOUNDED_JPEG_QUALITY`) when the
    file was a JPEG, else as lossless PNG.

    Raises
    ------
    BadImageError
        When the file is missing, corrupt, truncated or too large.
    """
    path = Path(path)
    img = load_image(path)
    if max_side and max(img.size) > max_side:
        return _bounded_image(path, bound_side(img, max_side))
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as probe:
        as_is = (
            probe.format in AS_IS_FORMATS
            and probe.mode == "RGB"
            and probe.getexif().get(EXIF_ORIENTATION, 1) == 1
        )
        suffix = AS_IS_FORMATS.get(probe.format, ".png")
    if not as_is:
        data, suffix = png_bytes(img), ".png"
    return {"bytes": data, "path": path.stem + suffix}, img.size


def _bounded_image(path: Path, img: Image.Image) -> tuple[dict, tuple[int, int]]:
    """The Arrow struct of ``img``, the image of ``path`` resized to ``--max-side`` (JPEG stays JPEG)."""
    with Image.open(path) as probe:
        was_jpeg = probe.format == "JPEG"
    buf = io.BytesIO()
    if was_jpeg:
        img.save(buf, format="JPEG", quality=BOUNDED_JPEG_QUALITY)
    else:
        img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": path.stem + (".jpg" if was_jpeg else ".png")}, img.size


def embed_map(path: str | Path | None, max_side: int = 0) -> dict | None:
    """The Arrow struct of a mask or label map (PNG kept as is, other formats as 8-bit PNG); None when absent.

    With ``max_side``, a map whose longer side exceeds it is resized by nearest neighbour (label values kept,
    aspect kept: the geometry its image gets from :func:`embed_image`) and stored as 8-bit PNG.

    Raises
    ------
    BadImageError
        When the file cannot be read as an image.
    """
    if path is None:
        return None
    path = Path(path)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if max_side and max(img.size) > max_side:
                data = png_bytes(bound_side(img.convert("L"), max_side, Image.Resampling.NEAREST))
            elif img.format != "PNG":
                data = png_bytes(img.convert("L"))
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(path, f"unreadable mask ({err})") from err
    return {"bytes": data, "path": path.stem + ".png"}


def png_bytes(img: Image.Image) -> bytes:
    """Encode ``img`` as PNG (deterministic for equal pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_example(
    example: dict, features: datasets.Features, max_side: int = 0
) -> tuple[dict, tuple[int, int]]:
    """Encode one builder example into an Arrow row with embedded images; returns the row and image size.

    ``max_side`` bounds the longer side of a real image and its masks (:func:`embed_image`); synthetic images are
    embedded as generated, byte for byte, so the SHA-256 their manifest line records is the digest of the
    embedded bytes too (their side is generate's ``--size``).

    Raises
    ------
    BadImageError
        When the image or one of its masks is unreadable.
    """
    row = {k: encode_nested_example(features[k], v) for k, v in example.items() if k not in IMAGE_COLUMNS}
    bound = max_side if example.get("origin") == "real" else 0
    row["image"], size = embed_image(example["image"], bound)
    row["mask"] = embed_map(example["mask"], bound)
    row["artifact_mask"] = embed_map(example["artifact_mask"], bound)
    return row, size


def row_bytes(row: dict) -> int:
    """Approximate Arrow size of an encoded row: the bytes of its images and strings."""
    total = 0
    for value in row.values():
        if isinstance(value, dict):
            total += len(value["bytes"]) + len(value["path"])
        elif isinstance(value, str):
            total += len(value)
        else:
            total += 8
    return total


# ----------------------------------------------------------------------------------------------------------------
# Shards


class ShardWriter:
    """Writes the rows of one split into bounded Parquet shards in the staging folder, one row group at a time.

    Parameters
    ----------
    staging : Path
        Folder for finished shards.
    split : str
        Split name; shards are ``<split>-NNNNN.parquet`` until the build completes.
    schema : pyarrow.Schema
        The Arrow schema of the features (with the ``huggingface`` metadata).
    cfg : PackageConfig
        Shard and row-group bounds.
    first_index : int
        Index of the next shard (shards already finished by an interrupted run come before it).
    """

    def __init__(self, staging: Path, split: str, schema: pa.Schema, cfg: PackageConfig, first_index: int):
        self.staging, self.split, self.schema, self.cfg = staging, split, schema, cfg
        self.index = first_index
        self._writer: pq.ParquetWriter | None = None
        self._reset_shard()

    def _reset_shard(self) -> None:
        self._rows: list[dict] = []
        self._buffered = 0
        self._stats = {"rows": 0, "consumed": 0, "num_bytes": 0, "skipped": {}}
        self._extent = {"width_min": 1 << 30, "width_max": 0, "height_min": 1 << 30, "height_max": 0}

    @property
    def _name(self) -> str:
        return f"{self.split}-{self.index:05d}.parquet"

    def skip(self, path: str, reason: str) -> None:
        """Count an example that was left out (bad image) into the current shard."""
        self._stats["consumed"] += 1
        self._stats["skipped"][path] = reason

    def add(self, row: dict, size: tuple[int, int]) -> ShardRecord | None:
        """Add an encoded row; returns the shard's record when this row closed it."""
        nbytes = row_bytes(row)
        self._rows.append(row)
        self._buffered += nbytes
        for side, value in zip(("width", "height"), size, strict=True):
            self._extent[f"{side}_min"] = min(self._extent[f"{side}_min"], value)
            self._extent[f"{side}_max"] = max(self._extent[f"{side}_max"], value)
        self._stats["consumed"] += 1
        if len(self._rows) >= self.cfg.row_group_rows or self._buffered >= self.cfg.row_group_bytes:
            self._flush()
        rows = self._stats["rows"] + len(self._rows)
        if (
            self._stats["num_bytes"] + self._buffered >= self.cfg.max_shard_bytes
            or rows >= self.cfg.max_shard_rows
        ):
            return self.close()
        return None

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self._sink = atomic_write(self.staging / self._name, "wb")
            self._writer = pq.ParquetWriter(self._sink.__enter__(), self.schema)
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        self._writer.write_table(table, row_group_size=len(self._rows))
        self._stats["rows"] += len(self._rows)
        self._stats["num_bytes"] += table.nbytes
        self._rows, self._buffered = [], 0

    def close(self) -> ShardRecord | None:
        """Finish the current shard (if it has rows) and return its record; the next add starts a new one."""
        self._flush()
        if self._writer is None:
            return None
        self._writer.close()
        self._sink.__exit__(None, None, None)
        self._writer = None
        record = ShardRecord(
            split=self.split,
            index=self.index,
            file=self._name,
            size=(self.staging / self._name).stat().st_size,
            **self._extent,
            **self._stats,
        )
        self.index += 1
        self._reset_shard()
        return record

    def abort(self, err: BaseException) -> None:
        """Drop the unfinished shard (its temporary file is removed)."""
        if self._writer is not None:
            self._writer.close()
            self._sink.__exit__(type(err), err, err.__traceback__)
            self._writer = None


def write_split(
    split: str,
    examples: Iterator[dict],
    total: int,
    features: datasets.Features,
    cfg: PackageConfig,
    staging: Path,
    done: list[ShardRecord],
) -> list[ShardRecord]:
    """Stream ``examples`` of one split into shards after the ``done`` ones; returns all the split's records."""
    records = list(done)
    skip = sum(r.consumed for r in done)
    writer = ShardWriter(staging, split, features.arrow_schema, cfg, first_index=len(done))
    bar = progress(
        islice(examples, skip, None), desc=f"package {split}", unit="img", total=total, initial=skip
    )
    try:
        for example in bar:
            try:
                row, size = encode_example(example, features, cfg.max_side)
            except BadImageError as err:
                logger.warning("skipped %s: %s", err.path, err.reason)
                writer.skip(str(err.path), err.reason)
                continue
            record = writer.add(row, size)
            if record is not None:
                _commit(staging, record, records)
        record = writer.close()
    except BaseException as err:
        writer.abort(err)
        raise
    if record is not None:
        _commit(staging, record, records)
    if not any(r.rows for r in records):
        raise StdaError(f"the {split} split has no readable images; see the skipped files above")
    return records


def _commit(staging: Path, record: ShardRecord, records: list[ShardRecord]) -> None:
    append_jsonl(staging / "shards.jsonl", asdict(record))
    records.append(record)


# ----------------------------------------------------------------------------------------------------------------
# Staging and resume


def examples_of(sources, split: str) -> Iterator[dict]:
    """The examples of one split, without their keys (the builder module's ``split_examples``)."""
    from stda_hf.dataset_script import split_examples

    return (ex for _, ex in split_examples(sources, split))


def scan_inputs(sources, splits: list[str], cfg: PackageConfig) -> tuple[str, dict[str, int]]:
    """Hash everything the shards depend on, streaming: every example (paths and metadata), the size and time
    of each file it names, the shard bounds and the package version. Returns the hash and rows per split."""
    bounds = {k: v for k, v in asdict(cfg).items() if k.startswith(("max_", "row_"))}
    digest = hashlib.sha256(json.dumps([bounds, __version__], sort_keys=True).encode())
    totals = {}
    for split in splits:
        totals[split] = 0
        for ex in examples_of(sources, split):
            stats = [(os.stat(ex[c]).st_size, os.stat(ex[c]).st_mtime_ns) for c in IMAGE_COLUMNS if ex[c]]
            digest.update(json.dumps([split, ex, stats], sort_keys=True).encode())
            totals[split] += 1
    return digest.hexdigest(), totals


def open_staging(out: Path, fingerprint: str) -> tuple[Path, dict[str, list[ShardRecord]]]:
    """The staging folder and the finished shards an interrupted run with the same inputs left there."""
    staging = out / STAGING
    inputs = staging / "inputs.json"
    if inputs.is_file() and _recorded_fingerprint(inputs) == fingerprint:
        return staging, _finished(staging)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json(inputs, {"fingerprint": fingerprint})
    return staging, {}


def _recorded_fingerprint(path: Path) -> str | None:
    """The fingerprint of the inputs the staging folder was built from; None when unreadable (it is rebuilt)."""
    try:
        return read_json(path, Fields(required={"fingerprint": str}))["fingerprint"]
    except StdaError:
        return None


SHARD_FIELDS = Fields(
    required={
        "split": str, "index": int, "file": str, "rows": int, "consumed": int, "num_bytes": int, "size": int,
        "width_min": int, "width_max": int, "height_min": int, "height_max": int,
    },
    optional={"skipped": dict},
)  # fmt: skip
"""The schema of a ``shards.jsonl`` line (:class:`ShardRecord`)."""


def _finished(staging: Path) -> dict[str, list[ShardRecord]]:
    done: dict[str, list[ShardRecord]] = {}
    recover = f"delete {staging}: the next `stda package` builds every shard again"
    for rec in read_records(staging / "shards.jsonl", SHARD_FIELDS, recover=recover):
        record = ShardRecord(**{k: v for k, v in rec.items() if k in SHARD_FIELDS.required or k == "skipped"})
        prefix = done.setdefault(record.split, [])
        path = staging / record.file
        if record.index == len(prefix) and path.is_file() and path.stat().st_size == record.size:
            prefix.append(record)
    if done:
        logger.info("resuming: %s", ", ".join(f"{s} {len(r)} shard(s) done" for s, r in done.items()))
    return done


def check_out_folder(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not a previous ``stda package`` output."""
    if not out.exists() or not any(out.iterdir()):
        return
    if (out / STAGING).is_dir() or ((out / "README.md").is_file() and (out / "data").is_dir()):
        return
    raise StdaError(f"--out {out} is not empty and holds no earlier package; choose an empty or new folder")


def publish_shards(out: Path, staging: Path, records: dict[str, list[ShardRecord]]) -> list[str]:
    """Move the staged shards to ``data/<split>-NNNNN-of-NNNNN.parquet``, drop stale ones; return their paths."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    names = []
    for split, recs in records.items():
        for r in recs:
            name = f"data/{split}-{r.index:05d}-of-{len(recs):05d}.parquet"
            os.replace(staging / r.file, out / name)
            names.append(name)
    for stale in sorted(set(p.relative_to(out).as_posix() for p in data.glob("*.parquet")) - set(names)):
        (out / stale).unlink()
    return names


# ----------------------------------------------------------------------------------------------------------------
# Facts for the card, read back from the written shards


def collect_facts(
    out: Path,
    shards: dict[str, list[str]],
    records: dict[str, list[ShardRecord]],
    sources,
    cfg: PackageConfig,
    synthetic_dir: Path | None,
) -> CardFacts:
    """Count what the card states on the rows actually written (metadata columns only, batch by batch)."""
    facts = CardFacts(
        name=cfg.name,
        pretty_name=cfg.pretty_name,
        source_kind=_source_kind(sources.real),
        splits={},
        licences=Counter(),
        skin_types={},
        artifacts={},
        real_per_class=Counter(),
        image_size=_image_size([r for recs in records.values() for r in recs]),
        download_size=sum((out / p).stat().st_size for paths in shards.values() for p in paths),
        skipped=sum(len(r.skipped) for recs in records.values() for r in recs),
        synthetic=_synthetic_facts(synthetic_dir) if synthetic_dir is not None else None,
        max_side=cfg.max_side,
    )
    for split, paths in shards.items():
        sf = facts.splits[split] = SplitFacts(name=split, num_files=len(paths))
        sf.num_bytes = sum(r.num_bytes for r in records[split])
        for path in paths:
            for batch in pq.ParquetFile(out / path).iter_batches(batch_size=1024, columns=SCAN_COLUMNS):
                for row in batch.to_pylist():
                    _count_row(facts, sf, row, sources.real)
    return facts


def _count_row(facts: CardFacts, sf: SplitFacts, row: dict, real) -> None:
    label = LABELS[row["label"]]
    sf.num_examples += 1
    sf.labels[label] += 1
    sf.lesions.update([row["lesion_id"]] if row["lesion_id"] else [])
    sf.patients.update([row["patient_id"]] if row["patient_id"] else [])
    sf.no_lesion += not row["lesion_id"]
    sf.no_patient += not row["patient_id"]
    sf.masks += row["mask"] is not None
    sf.artifact_masks += row["artifact_mask"] is not None
    facts.licences[row["copyright_license"]] += 1
    source = real[row["content_isic_id"] or row["isic_id"]]
    skin = next((source.extra[c] for c in SKIN_TYPE_COLUMNS if source.extra.get(c)), None)
    if skin:
        facts.skin_types.setdefault(sf.name, Counter())[skin] += 1
    if row["origin"] == "real":
        facts.real_per_class[label] += 1
        kinds = [k for k in (source.extra.get("artifacts") or "").split(";") if k]
        if "artifacts" in source.extra:
            facts.artifacts.setdefault(label, Counter()).update(kinds)
    elif facts.synthetic is not None:
        facts.synthetic.add(
            label,
            row["pseudo_label_confidence"],
            row["pseudo_label_teacher"],
            row["content_isic_id"],
            row["style_isic_id"],
        )


def _source_kind(real) -> str:
    if real.layout == "imagefolder":
        return "imagefolder"
    if all(im.attribution == PHANTOM_ATTRIBUTION for im in real.images):
        return "phantom"
    return "isic"


def _image_size(records: list[ShardRecord]) -> dict[str, int]:
    return {
        "width_min": min(r.width_min for r in records),
        "width_max": max(r.width_max for r in records),
        "height_min": min(r.height_min for r in records),
        "height_max": max(r.height_max for r in records),
    }


def _synthetic_facts(root: Path) -> SyntheticFacts:
    summary = _read_mapping(root / "labels_summary.json")
    threshold = summary.get("min_confidence")
    return SyntheticFacts(
        settings=_read_mapping(root / "generate.yaml"),
        label_summary=summary,
        threshold=float(threshold) if isinstance(threshold, (int, float)) and threshold > 0 else None,
    )


def _read_mapping(path: Path) -> dict:
    """A YAML or JSON mapping, or {} when the file is missing (the card then says so)."""
    if not os.path.lexists(path):
        logger.warning("%s not found; the card will not list what it holds", path)
        return {}
    return read_yaml(path, recover="re-run the stage that wrote it")


# ----------------------------------------------------------------------------------------------------------------
# Preview grid


def write_preview(out: Path, shards: dict[str, list[str]], per_row: int, tile: int = 96) -> None:
    """``preview.png``: the first ``per_row`` real benign, real malignant and synthetic images, one row each."""
    rows = [
        _first_images(out, shards.get("train", []), per_row, label=0),
        _first_images(out, shards.get("train", []), per_row, label=1),
    ]
    if "synthetic" in shards:
        rows.append(_first_images(out, shards["synthetic"], per_row, label=None))
    names = ["real benign", "real malignant", "synthetic"]
    margin = 110
    grid = Image.new("RGB", (margin + per_row * tile, len(rows) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for r, images in enumerate(rows):
        draw.text((6, r * tile + tile // 2 - 6), names[r], fill="black")
        for c, img in enumerate(images):
            grid.paste(ImageOps.contain(img, (tile - 4, tile - 4)), (margin + c * tile + 2, r * tile + 2))
    write_bytes(out / "preview.png", png_bytes(grid))


def _first_images(out: Path, paths: list[str], n: int, label: int | None) -> list[Image.Image]:
    found: list[Image.Image] = []
    for path in paths:
        for batch in pq.ParquetFile(out / path).iter_batches(batch_size=64, columns=["image", "label"]):
            for row in batch.to_pylist():
                if label is None or row["label"] == label:
                    with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
                        found.append(img.convert("RGB"))
                if len(found) == n:
                    return found
    return found


# ----------------------------------------------------------------------------------------------------------------
# The stage


def package(
    real: str | Path,
    out: str | Path,
    synthetic: str | Path | None = None,
    cfg: PackageConfig | None = None,
) -> PackageResult:
    """Write the Hub dataset repository for ``real`` (and ``synthetic``) into ``out``.

    Parameters
    ----------
    real : path
        Real-image folder with ``splits.csv`` (``stda split``).
    out : path
        The repository folder to write (created; a previous package there is replaced).
    synthetic : path, optional
        Synthetic folder with ``manifest.jsonl`` and ``labels.jsonl`` (``stda generate`` then ``stda label``).
    cfg : PackageConfig, optional
        Repo id, card title, shard and row-group bounds.

    Returns
    -------
    PackageResult
        Rows per split and class, the files written, the dataset licence and any skipped images.

    Raises
    ------
    StdaError
        Missing splits or labels, leakage, synthetic images not derived from train images of ``real``, a
        non-empty unrelated ``out``, or a split without readable images.
    """
    from stda_hf.dataset_script import FEATURES, load_sources

    cfg = cfg or PackageConfig()
    out = Path(out)
    check_separate(out, {"real-image folder": real, "synthetic folder": synthetic})
    check_out_folder(out)
    sources = load_sources(real, synthetic)  # reads and checks the sources; refusals happen here
    unsplit = unsplit_report(sources.real)
    left_out, kept = leave_out_failed(sources, synthetic, cfg.keep_failed)
    splits = sources.split_names()
    fingerprint, totals = scan_inputs(sources, splits, cfg)
    staging, done = open_staging(out, fingerprint)
    records = {
        split: write_split(
            split, examples_of(sources, split), totals[split], FEATURES, cfg, staging, done.get(split, [])
        )
        for split in splits
    }
    result = _finish(out, staging, records, sources, FEATURES, cfg, synthetic, (left_out, kept))
    result.skipped.update(unsplit)
    result.left_out_failed = left_out
    return result


def unsplit_report(real) -> dict[str, str]:
    """``{path: reason}`` for the labelled real images ``splits.csv`` leaves out (logged): in no split."""
    why = "in no split of splits.csv (added after `stda split`?); re-run `stda split` to include it"
    missing = {str(im.path): why for im in real.unsplit()}
    if missing:
        logger.warning(
            "%d labelled image(s) of %s are in no split of splits.csv and are left out; re-run `stda split`",
            len(missing),
            real.root,
        )
    return missing


def leave_out_failed(sources, synthetic: str | Path | None, keep: bool) -> tuple[dict[str, int], list[dict]]:
    """Drop from ``sources`` the synthetic images whose quality verdict is not ``ok``, unless ``keep``.

    Returns ``{verdict: images left out}`` and the manifest lines of the synthetic images kept (for the card).
    Lines written before the quality gate existed count as ``ok``.
    """
    if synthetic is None:
        return {}, []
    manifest = {r["id"]: r for r in read_manifest(Path(synthetic) / "manifest.jsonl")}
    from stda_hf.dataset_script import verdict_of

    verdict = {i: verdict_of(r) for i, r in manifest.items()}
    present = {s.id for s in sources.synthetic}  # `stda label` leaves failed images unlabelled by default
    left_out = Counter(v for i, v in verdict.items() if v != "ok" and (not keep or i not in present))
    if keep and left_out:
        logger.warning(
            "--keep-failed: %d failed image(s) have no pseudo-label (stda label left them out); "
            "run `stda label --keep-failed` to include them",
            sum(left_out.values()),
        )
    sources.synthetic = [s for s in sources.synthetic if keep or verdict[s.id] == "ok"]
    if left_out:
        logger.info(
            "left out %d synthetic image(s) that failed the quality gate (%s); --keep-failed keeps them",
            sum(left_out.values()),
            ", ".join(f"{v} {n}" for v, n in sorted(left_out.items())),
        )
    return dict(sorted(left_out.items())), [manifest[s.id] for s in sources.synthetic]


def _finish(out, staging, records, sources, features, cfg, synthetic, gate=({}, [])) -> PackageResult:
    from stda_hf.dataset_script.skin_lesions import CITATION

    names = publish_shards(out, staging, records)
    shards = {s: [n for n in names if n.startswith(f"data/{s}-")] for s in records}
    facts = collect_facts(out, shards, records, sources, cfg, Path(synthetic) if synthetic else None)
    if facts.synthetic is not None:
        engine = _read_mapping(Path(synthetic) / "engine.json")
        facts.synthetic.add_generation(gate[1], gate[0], engine)
    write_text(out / "README.md", render_card(facts, features, CITATION))
    _write_attribution(out, shards)
    write_preview(out, shards, cfg.preview_per_row)
    skipped = {p: why for recs in records.values() for r in recs for p, why in r.skipped.items()}
    shutil.rmtree(staging)
    report = SkipReport(skipped=dict(skipped))
    if report:
        logger.warning("%s; they are left out of the dataset", report.summary())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    counts = {s: {lab: f.labels[lab] for lab in LABELS} for s, f in facts.splits.items()}
    licence = dataset_license(set(facts.licences))
    return PackageResult(out=out, counts=counts, files=files, license=licence, skipped=skipped)


def _write_attribution(out: Path, shards: dict[str, list[str]]) -> None:
    for old in (out / "LICENSES").glob("*.txt") if (out / "LICENSES").is_dir() else []:
        old.unlink()
    rows = (
        row
        for paths in shards.values()
        for path in paths
        for batch in pq.ParquetFile(out / path).iter_batches(
            batch_size=1024, columns=["isic_id", "copyright_license", "attribution"]
        )
        for row in batch.to_pylist()
    )
    write_attribution(out, rows, title="Attribution: every image of this dataset")
