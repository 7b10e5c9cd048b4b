"""What a fetch folder records about its images: ``metadata.csv``, the digest journal, each file's embedded rights.

The archive records ``files.full.size`` at ingest, then embeds IPTC/XMP credit and licence into every JPEG when
it publishes it, so a served JPEG is a few KB larger than stated. Both sizes, the SHA-256 and the embedded credit
and licence go into a file's ``metadata.csv`` row (:func:`file_columns`). ``metadata.csv`` is appended one row
per finished image (:class:`MetadataLog`); the SHA-256 of every file is journalled before it is renamed into
``images/`` (:class:`DigestJournal`), so a file a killed run left without its row can be checked and kept.
"""

from __future__ import annotations

import csv
import html
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image, IptcImagePlugin

from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import (
    append_jsonl,
    append_text,
    atomic_write,
    csv_text,
    drop_torn_tail,
    open_csv,
    read_jsonl,
    write_text,
)
from stda_hf.data.images import IMAGE_EXTENSIONS
from stda_hf.data.real import REQUIRED_COLUMNS
from stda_hf.fetch.api import csv_cell

logger = logging.getLogger(__name__)

DIGESTS_FILE = ".fetch_digests.jsonl"
"""One line per file renamed into ``images/``: id and SHA-256, written just before the rename."""


# ----------------------------------------------------------------------------------------------------------------
# What the archive embeds in each file


def embedded_rights(path: str | Path) -> tuple[str, str]:
    """The credit (IPTC ``Credit``) and licence (XMP ``xmpRights:UsageTerms``) embedded in an image file.

    The archive writes them into every JPEG when it publishes it (the per-image credit; the API's
    ``attribution`` is the cohort's default). ``("", "")`` where the file carries none (PNG, TIFF).
    """
    try:
        with Image.open(path) as img:
            iptc = IptcImagePlugin.getiptcinfo(img) or {}
            xmp = img.info.get("xmp") or b""
    except (OSError, SyntaxError, ValueError, IndexError):
        return "", ""
    credit = iptc.get((2, 110), b"")
    if isinstance(credit, list):
        credit = credit[0] if credit else b""
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)
    return csv_cell(credit.decode("utf-8", "replace")), csv_cell(_xmp_text(text, "xmpRights:UsageTerms"))


def embedded_image_id(path: str | Path) -> str:
    """The ISIC id the archive embeds in a file (XMP ``plus:ImageSupplierImageID``, else ``dc:title``); ""
    where the file carries none (PNG, TIFF, or not an image)."""
    try:
        with Image.open(path) as img:
            xmp = img.info.get("xmp") or b""
    except (OSError, SyntaxError, ValueError, IndexError):
        return ""
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)
    return (_xmp_text(text, "plus:ImageSupplierImageID") or _xmp_text(text, "dc:title")).strip()


def _xmp_text(xmp: str, name: str) -> str:
    """One property of an XMP packet, as an element (plain or ``rdf:Alt`` list) or as an attribute."""
    element = re.search(rf"<{name}\b[^>]*>(.*?)</{name}>", xmp, re.S)
    if element:
        item = re.search(r"<rdf:li\b[^>]*>(.*?)</rdf:li>", element.group(1), re.S)
        return html.unescape((item or element).group(1).strip())
    attribute = re.search(rf'\b{name}="([^"]*)"', xmp)
    return html.unescape(attribute.group(1)) if attribute else ""


FILE_COLUMNS = (
    "api_attribution",
    "api_license",
    "embedded_credit",
    "embedded_license",
    "file_size",
    "sha256",
    "stated_size",
)
"""What ``fetch`` adds to a record's row about the file it kept."""


def file_columns(row: dict[str, str], path: Path, stated: int, sha256: str) -> dict[str, str]:
    """``row`` with the file's sizes, digest and embedded credit and licence; ``attribution`` becomes the file's
    credit where it has one (the per-image credit), the API's cohort default staying in ``api_attribution``."""
    credit, license_ = embedded_rights(path)
    api_attribution = row["attribution"]
    return {
        "api_license": row["copyright_license"],
        **row,
        "attribution": credit or api_attribution,
        "api_attribution": api_attribution,
        "embedded_credit": credit,
        "embedded_license": license_,
        "file_size": str(path.stat().st_size),
        "stated_size": str(stated),
        "sha256": sha256,
    }


# ----------------------------------------------------------------------------------------------------------------
# The folder: metadata.csv appended row by row, images renamed in only when verified


class MetadataLog:
    """``metadata.csv`` of a fetch folder, appended one row per finished image.

    On opening, a crash-torn last row is cut, and rows whose image file is gone (or repeated ids) are dropped,
    so every row names an image on disk. New metadata keys widen the header: the file is rewritten atomically,
    once per new key. Only ``id -> diagnosis_1`` is kept in memory; rewrites stream the file.
    """

    def __init__(self, root: Path):
        self.path = root / "metadata.csv"
        self.images = root / "images"
        self.diagnoses: dict[str, str] = {}  # isic_id -> diagnosis_1 of every row
        self.columns: list[str] = list(REQUIRED_COLUMNS)
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        drop_torn_tail(self.path)
        on_disk = _image_stems(self.images)
        dropped = 0
        with open_csv(self.path) as reader:
            self.columns = _checked_header(self.path, reader.fieldnames)
            for row in reader:
                isic_id = row.get("isic_id") or ""
                if isic_id in on_disk and isic_id not in self.diagnoses:
                    self.diagnoses[isic_id] = row.get("diagnosis_1") or ""
                else:
                    dropped += 1
        if dropped:
            logger.warning("%s: dropped %d row(s) without an image or repeated", self.path, dropped)
            self._rewrite()

    def __contains__(self, isic_id: object) -> bool:
        return isic_id in self.diagnoses

    def __len__(self) -> int:
        return len(self.diagnoses)

    def count(self, diagnosis: str) -> int:
        """Rows with this ``diagnosis_1`` value."""
        return sum(d == diagnosis for d in self.diagnoses.values())

    def append(self, row: dict[str, str]) -> None:
        """Add one row (its image must already be in ``images/``)."""
        extra = set(self.columns[len(REQUIRED_COLUMNS) :])
        if not self.path.exists():
            self.columns = list(REQUIRED_COLUMNS) + sorted(extra | (set(row) - set(REQUIRED_COLUMNS)))
            write_text(self.path, self._format(row, header=True))
        else:
            if set(row) - set(self.columns):
                self.columns = list(REQUIRED_COLUMNS) + sorted(extra | (set(row) - set(REQUIRED_COLUMNS)))
                self._rewrite()
            append_text(self.path, self._format(row, header=False))
        self.diagnoses[row["isic_id"]] = row["diagnosis_1"]

    def attribution_rows(self) -> Iterator[dict[str, str]]:
        """``isic_id``, ``copyright_license`` and ``attribution`` of every row, streamed from the file."""
        with open_csv(self.path) as reader:
            for row in reader:
                yield {k: row[k] for k in ("isic_id", "copyright_license", "attribution")}

    def disagreements(self) -> tuple[int, dict[str, str]]:
        """How many rows embed a credit other than the API's attribution, and the rows whose embedded licence
        is not the API's (id -> what each says and which applies: the more restrictive), streamed."""
        credits, licences = 0, {}
        if not self.path.exists():
            return credits, licences
        with open_csv(self.path) as reader:
            for row in reader:
                credit, api = row.get("embedded_credit") or "", row.get("api_attribution") or ""
                credits += bool(credit and api and credit != api)
                embedded = row.get("embedded_license") or ""
                api_license = row.get("api_license") or row.get("copyright_license")
                if embedded and embedded != api_license:
                    licences[row["isic_id"]] = (
                        f"embedded {embedded!r}, API {api_license!r}: {row.get('copyright_license')!r} applies"
                    )
        return credits, licences

    def _format(self, row: dict, header: bool) -> str:
        return csv_text([row], self.columns, header=header)

    def _rewrite(self) -> None:
        """Stream the file into a new one with the current columns, keeping each known id's first row."""
        seen = set()
        with open_csv(self.path) as src, atomic_write(self.path, "w") as dst:
            writer = csv.DictWriter(dst, fieldnames=self.columns, restval="", lineterminator="\n")
            writer.writeheader()
            for row in src:
                if row.get("isic_id") in self.diagnoses and row["isic_id"] not in seen:
                    seen.add(row["isic_id"])
                    writer.writerow(row)


def _checked_header(path: Path, fieldnames: Sequence[str] | None) -> list[str]:
    header = list(fieldnames or [])
    if header[: len(REQUIRED_COLUMNS)] != list(REQUIRED_COLUMNS):
        raise StdaError(
            f"{path} does not start with the columns {list(REQUIRED_COLUMNS)}; it was not written by "
            "`stda fetch`: use another --out"
        )
    return header


def count_on_disk(root: str | Path, diagnoses: dict[str, str]) -> dict[str, int]:
    """Rows per class in ``root/metadata.csv``, read only (a dry run changes nothing)."""
    path = Path(root) / "metadata.csv"
    if not path.exists():
        return {}
    with open_csv(path) as reader:
        counts = Counter(row.get("diagnosis_1") for row in reader)
    return {name: counts.get(d, 0) for name, d in diagnoses.items()}


def _image_stems(folder: Path) -> set[str]:
    """Ids of the finished images in ``folder`` (one directory listing; staging files are elsewhere)."""
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {
            stem
            for e in entries
            if (stem := os.path.splitext(e.name)[0])
            and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        }


class DigestJournal:
    """``.fetch_digests.jsonl``: the SHA-256 of every file renamed into ``images/``, written before the rename.

    A run killed between the rename and the ``metadata.csv`` row leaves a file without its row; the next run
    keeps it (without downloading it again) only when it decodes and its digest matches this journal.
    """

    def __init__(self, root: Path):
        self.path = root / DIGESTS_FILE
        self._lock = threading.Lock()

    def record(self, isic_id: str, sha256: str) -> None:
        """Journal one file's digest (durably; called from worker threads)."""
        with self._lock:
            append_jsonl(self.path, {"isic_id": isic_id, "sha256": sha256})

    def digests(self) -> dict[str, str]:
        """Id -> the last digest journalled for it."""
        return {r["isic_id"]: r["sha256"] for r in read_jsonl(self.path) if "isic_id" in r and "sha256" in r}
