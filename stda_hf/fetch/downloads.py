"""Download one class's images through a bounded worker pool: stream, verify, journal, rename into ``images/``.

Each file is streamed to a staging name (:data:`STAGING_DIR`), judged by its own ``Content-Length`` and a full
decode, its digest journalled, and only then renamed into ``images/``; its ``metadata.csv`` row is appended after
that, on the calling thread. At most ``2 * workers`` downloads are in flight. A finished file that a killed run
left without its row is kept without downloading it again when it decodes and matches its journalled digest.
Public file URLs are permanent; a private image's URL is signed and expires (a refused one is refreshed from the
API, at most :data:`MAX_URL_REFRESHES` times).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.utils import sha256_file
from stda_hf.data.images import SkipReport, load_image
from stda_hf.fetch.api import (
    FetchConfig,
    ImageToFetch,
    IsicClient,
    SkipImage,
    UrlExpired,
    build_query,
    checked_id,
    full_file,
    parse_record,
)
from stda_hf.fetch.records import DigestJournal, MetadataLog, file_columns

logger = logging.getLogger(__name__)

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp", "WEBP": "webp"}
MAX_URL_REFRESHES = 2
STAGING_DIR = ".incoming"
"""Where a file is streamed before it is checked and renamed into ``images/``."""


def accept_download(
    staging: Path, images: Path, isic_id: str, journal: DigestJournal | None = None, sha256: str = ""
) -> Path:
    """Decode a downloaded file, journal its digest and rename it to ``images/<isic_id>.<ext>``; a bad file is
    deleted.

    Raises
    ------
    SkipImage
        The file does not decode, or is in a format the project does not read.
    """
    try:
        load_image(staging)
        with Image.open(staging) as img:
            ext = FORMAT_EXTENSIONS.get(img.format or "")
    except (BadImageError, OSError) as err:
        staging.unlink(missing_ok=True)
        raise SkipImage(
            f"the downloaded file is not a usable image ({getattr(err, 'reason', err)})"
        ) from None
    if ext is None:
        staging.unlink(missing_ok=True)
        raise SkipImage(f"unsupported image format; readable formats: {sorted(FORMAT_EXTENSIONS)}")
    final = images / f"{checked_id(isic_id)}.{ext}"
    for other in _candidates(images, isic_id):
        if other != final:
            other.unlink(missing_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    if journal is not None:
        journal.record(isic_id, sha256 or sha256_file(staging))
    os.replace(staging, final)
    return final


def _candidates(images: Path, isic_id: str) -> list[Path]:
    """Existing files ``images/<isic_id>.<ext>`` (looked up by name: no directory scan per image)."""
    return [
        images / f"{isic_id}.{ext}"
        for ext in FORMAT_EXTENSIONS.values()
        if (images / f"{isic_id}.{ext}").exists()
    ]


def fetch_one(
    client: IsicClient, item: ImageToFetch, root: Path, journal: DigestJournal | None = None
) -> dict[str, str]:
    """Download, verify and file one image (run in a worker thread); return its finished ``metadata.csv`` row.

    An expired signed URL (a private image's) is replaced by a fresh one from ``images/{isic_id}/`` (at most
    :data:`MAX_URL_REFRESHES` times).
    """
    url, size = item.url, item.size
    staging = root / STAGING_DIR / f"{item.isic_id}.download"
    for refresh in range(MAX_URL_REFRESHES + 1):
        try:
            got = client.download(url, size, staging)
            break
        except UrlExpired as err:
            if refresh == MAX_URL_REFRESHES:
                raise SkipImage(f"download URL refused ({err}) even after refreshing it") from None
            try:
                record = client.image(item.isic_id)
            except StdaError as refused:
                raise SkipImage(f"could not refresh the download URL: {refused}") from None
            if record is None:
                raise SkipImage("the archive no longer knows this image") from None
            url, size = full_file(record)
            logger.debug("%s: download URL refused (%s); refreshed it", item.isic_id, err)
    final = accept_download(staging, root / "images", item.isic_id, journal, got.sha256)
    if got.size != size:
        logger.debug("%s: %d bytes served, %d stated by the API", item.isic_id, got.size, size)
    return file_columns(item.row, final, size, got.sha256)


@dataclass
class DownloadRun:
    """One fetch's downloads: its settings, folder, client, pool and progress bar, and what it did so far."""

    cfg: FetchConfig
    root: Path
    client: IsicClient
    log: MetadataLog
    journal: DigestJournal
    pool: ThreadPoolExecutor
    bar: object
    refused: dict[str, set[str]]  # diagnosis_1 -> ids of the records refused for good, this run and before
    report: SkipReport = field(default_factory=SkipReport)
    downloaded: int = 0
    adopted: int = 0
    bytes: int = 0


def sample_key(seed: int, isic_id: str) -> str:
    """Sort key of ``--sample random``: a seeded hash of the id, so a larger --limit keeps the smaller sample."""
    return hashlib.sha256(f"{seed}:{isic_id}".encode()).hexdigest()


def _records(run: DownloadRun, diagnosis: str) -> Iterator[object]:
    """The class's search records in the order ``--limit`` takes them: creation order, or a seeded shuffle."""
    records = run.client.search(build_query(run.cfg, diagnosis))
    if run.cfg.sample == "random" and run.cfg.limit:
        keyed = [
            (sample_key(run.cfg.seed, str(r.get("isic_id") if isinstance(r, dict) else r)), r)
            for r in records
        ]
        return (r for _, r in sorted(keyed, key=lambda kr: kr[0]))
    return records


def fetch_class(run: DownloadRun, diagnosis: str) -> None:
    """Keep at most ``2 * workers`` downloads in flight until the class has ``limit`` images or none are left."""
    want = run.cfg.limit or math.inf
    done = run.log.count(diagnosis)
    records = _records(run, diagnosis)
    pending: dict[Future, ImageToFetch] = {}
    exhausted = False
    while True:
        while not exhausted and len(pending) < 2 * run.cfg.workers and done + len(pending) < want:
            record = next(records, None)
            if record is None:
                exhausted = True
                break
            item = _admit(run, record, diagnosis, {i.isic_id for i in pending.values()})
            if item == "adopted":
                done += 1
            elif isinstance(item, ImageToFetch):
                pending[run.pool.submit(fetch_one, run.client, item, run.root, run.journal)] = item
        if not pending:
            return
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            done += _settle(run, pending.pop(future), future)


def _admit(
    run: DownloadRun, record: object, diagnosis: str, in_flight: set[str]
) -> ImageToFetch | str | None:
    """An item to download, "adopted" for a verified file a killed run left without a row, or None (skip)."""
    try:
        item = parse_record(record, diagnosis, run.cfg.licenses)
    except SkipImage as err:
        key = str(record.get("isic_id") if isinstance(record, dict) else record)[:80]
        run.report.add(key, err.reason)
        if err.permanent:
            run.refused.setdefault(diagnosis, set()).add(key)
        return None
    if item.isic_id in run.log or item.isic_id in in_flight:
        return None
    orphans = _candidates(run.root / "images", item.isic_id)
    if len(orphans) == 1 and _decodes(orphans[0]):
        digest = sha256_file(orphans[0])
        if run.journal.digests().get(item.isic_id) == digest:
            run.log.append(file_columns(item.row, orphans[0], item.size, digest))
            run.adopted += 1
            run.bar.update(1)
            return "adopted"
    return item


def _decodes(path: Path) -> bool:
    try:
        load_image(path)
    except BadImageError:
        return False
    return True


def _settle(run: DownloadRun, item: ImageToFetch, future: Future) -> int:
    """Record a finished download: append its row (1) or note why it was skipped (0)."""
    try:
        row = future.result()
    except SkipImage as err:
        run.report.add(item.isic_id, err.reason)
        run.bar.update(1)
        run.bar.set_postfix_str(f"{human_bytes(run.bytes)}, {len(run.report)} skipped", refresh=False)
        return 0
    run.log.append(row)
    run.downloaded += 1
    run.bytes += int(row["file_size"])
    run.bar.update(1)
    run.bar.set_postfix_str(f"{human_bytes(run.bytes)}, {len(run.report)} skipped", refresh=False)
    return 1


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units for people: ``512 B``, ``3.2 KB``, ``1.5 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
