"""Download one class's images through a bounded worker pool: stream, verify, journal, rename into ``images/``.

Each file is streamed to a staging name (:data:`STAGING_DIR`), judged by its own ``Content-Length``, checked
against its record (:func:`check_content`: a full decode, the record's pixel size, the image id the archive
embeds; a mismatch is retried like a broken transfer), its licence settled (:func:`settle_license`: the more
restrictive of the API's and the file's), its digest journalled, and only then renamed into ``images/``; its
``metadata.csv`` row is appended after that, on the calling thread. At most ``2 * workers`` downloads are in
flight, on daemon threads (:class:`WorkerPool`): an interrupted run does not wait for a transfer stuck in a
read. A finished file that a killed run left without its row is kept without downloading it again when it
decodes and matches its journalled digest. Public file URLs are permanent; a private image's URL is signed and
expires (a refused one is refreshed from the API, at most :data:`MAX_URL_REFRESHES` times).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from stda_hf.core.errors import BadImageError, StdaError
from stda_hf.core.utils import sha256_file
from stda_hf.data.images import SkipReport, load_image
from stda_hf.data.licenses import LICENSES
from stda_hf.fetch.api import (
    BadContent,
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
from stda_hf.fetch.records import DigestJournal, MetadataLog, embedded_image_id, embedded_rights, file_columns

logger = logging.getLogger(__name__)

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp", "WEBP": "webp"}
MAX_URL_REFRESHES = 2
STAGING_DIR = ".incoming"
"""Where a file is streamed before it is checked and renamed into ``images/``."""


def check_content(path: Path, isic_id: str, pixels: tuple[int, int] | None = None) -> str:
    """Check a downloaded file against its record; return its extension.

    It must decode fully, be in a format the project reads, have the record's pixel size (``pixels_x``,
    ``pixels_y``, where stated: the archive measures them on the file it serves, orientation applied and
    stripped), and carry the record's id where it embeds one (XMP ``plus:ImageSupplierImageID`` or
    ``dc:title``; PNG and TIFF files embed none).

    Raises
    ------
    BadContent
        Saying what differs.
    """
    try:
        load_image(path)
        with Image.open(path) as img:
            ext, size = FORMAT_EXTENSIONS.get(img.format or ""), img.size
    except (BadImageError, OSError) as err:
        raise BadContent(
            f"the downloaded file is not a usable image ({getattr(err, 'reason', err)})"
        ) from None
    if ext is None:
        raise BadContent(f"unsupported image format; readable formats: {sorted(FORMAT_EXTENSIONS)}")
    if pixels is not None and tuple(size) != tuple(pixels):
        raise BadContent(f"the file is {size[0]}x{size[1]} pixels, the record states {pixels[0]}x{pixels[1]}")
    embedded = embedded_image_id(path)
    if embedded and embedded != isic_id:
        raise BadContent(f"the file embeds the image id {embedded[:40]!r}: another image's bytes")
    return ext


def settle_license(row: dict[str, str], path: Path, licenses: tuple[str, ...]) -> dict[str, str]:
    """``row`` under the more restrictive of the API's licence and the one the file embeds (the README's rule),
    the API's kept in ``api_license``; the credit stays the id's own.

    Raises
    ------
    SkipImage
        Permanently: the winning licence is outside ``licenses`` (or one the project does not know).
    """
    api = row["copyright_license"]
    _, embedded = embedded_rights(path)
    settled = api
    if embedded and embedded != api:
        rank = {name: lic.restrictiveness for name, lic in LICENSES.items()}
        settled = max((api, embedded), key=lambda name: rank.get(name, len(rank)))
        logger.warning(
            "%s: the file embeds licence %r, the API says %r; %r applies",
            row["isic_id"],
            embedded,
            api,
            settled,
        )
    if settled not in licenses:
        raise SkipImage(
            f"the file embeds licence {embedded!r}, more restrictive than the API's {api!r} and outside the "
            f"selected {list(licenses)}",
            permanent=True,
            kind="licence",
        )
    return {**row, "copyright_license": settled, "api_license": api}


def accept_download(
    staging: Path,
    images: Path,
    isic_id: str,
    journal: DigestJournal | None = None,
    sha256: str = "",
    ext: str | None = None,
) -> Path:
    """Check a downloaded file (:func:`check_content`, unless its ``ext`` says it was), journal its digest and
    rename it to ``images/<isic_id>.<ext>``; a bad file is deleted.

    Raises
    ------
    SkipImage
        The file does not decode, or is in a format the project does not read.
    """
    try:
        ext = ext or check_content(staging, isic_id)
    except BadContent as err:
        staging.unlink(missing_ok=True)
        raise SkipImage(err.reason, kind="content") from None
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
    checked: dict[str, str] = {}

    def verify(path: Path) -> None:
        checked["ext"] = check_content(path, item.isic_id, item.pixels)

    for refresh in range(MAX_URL_REFRESHES + 1):
        try:
            got = client.download(url, size, staging, verify)
            break
        except UrlExpired as err:
            if refresh == MAX_URL_REFRESHES:
                raise SkipImage(
                    f"download URL refused ({err}) even after refreshing it", kind="server"
                ) from None
            try:
                record = client.image(item.isic_id)
            except StdaError as refused:
                raise SkipImage(f"could not refresh the download URL: {refused}") from None
            if record is None:
                raise SkipImage("the archive no longer knows this image", kind="server") from None
            url, size = full_file(record)
            logger.debug("%s: download URL refused (%s); refreshed it", item.isic_id, err)
    try:
        row = settle_license(item.row, staging, client.cfg.licenses)
    except SkipImage:
        staging.unlink(missing_ok=True)
        raise
    final = accept_download(staging, root / "images", item.isic_id, journal, got.sha256, checked.get("ext"))
    if got.size != size:
        logger.debug("%s: %d bytes served, %d stated by the API", item.isic_id, got.size, size)
    return file_columns(row, final, size, got.sha256)


class WorkerPool:
    """A fixed set of daemon threads running submitted calls, each with a :class:`~concurrent.futures.Future`.

    Unlike :class:`~concurrent.futures.ThreadPoolExecutor`, whose threads the interpreter joins at exit, a
    worker stuck in a socket read cannot hold the process: :meth:`shutdown` waits at most ``timeout`` seconds.
    """

    def __init__(self, workers: int, name: str = "worker"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on a worker; its result or exception lands in the returned future."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:
                future.set_exception(err)

    def shutdown(self, timeout: float | None = None) -> None:
        """Let the workers finish the queued calls and end; wait for them at most ``timeout`` seconds."""
        for _ in self._threads:
            self._jobs.put(None)
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))


@dataclass
class DownloadRun:
    """One fetch's downloads: its settings, folder, client, pool and progress bar, and what it did so far."""

    cfg: FetchConfig
    root: Path
    client: IsicClient
    log: MetadataLog
    journal: DigestJournal
    pool: WorkerPool
    bar: object
    refused: dict[str, set[str]]  # diagnosis_1 -> ids of the records refused for good, this run and before
    counts: dict[str, int] = field(default_factory=dict)  # diagnosis_1 -> the archive's count of matches
    report: SkipReport = field(default_factory=SkipReport)
    kinds: Counter = field(default_factory=Counter)  # skip kind -> images skipped this run
    short: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # diagnosis_1 -> (count, records that came)
    downloaded: int = 0
    adopted: int = 0
    bytes: int = 0

    def skip(self, key: str, err: SkipImage, diagnosis: str) -> None:
        """Record one skipped image with its reason and kind (and as refused for good when permanent)."""
        self.report.add(key, " ".join(err.reason.split()))  # one line per file
        self.kinds[err.kind] += 1
        if err.permanent:
            self.refused.setdefault(diagnosis, set()).add(key)


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
    """Keep at most ``2 * workers`` downloads in flight until the class has ``limit`` images or none are left.

    A search that ends before the archive's ``count`` of records came is noted in :attr:`DownloadRun.short`.
    """
    want = run.cfg.limit or math.inf
    done = run.log.count(diagnosis)
    records = _records(run, diagnosis)
    pending: dict[Future, ImageToFetch] = {}
    exhausted, arrived = False, 0
    while True:
        while not exhausted and len(pending) < 2 * run.cfg.workers and done + len(pending) < want:
            record = next(records, None)
            if record is None:
                exhausted = True
                count = run.counts.get(diagnosis, 0)
                if arrived < count:
                    run.short[diagnosis] = (count, arrived)
                    logger.warning(
                        "%s: the archive counted %d matching records but its search gave %d",
                        diagnosis,
                        count,
                        arrived,
                    )
                break
            arrived += 1
            item = _admit(run, record, diagnosis, {i.isic_id for i in pending.values()})
            if item == "adopted":
                done += 1
            elif isinstance(item, ImageToFetch):
                pending[run.pool.submit(fetch_one, run.client, item, run.root, run.journal)] = item
        if not pending:
            return
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            done += _settle(run, pending.pop(future), future, diagnosis)


def _admit(
    run: DownloadRun, record: object, diagnosis: str, in_flight: set[str]
) -> ImageToFetch | str | None:
    """An item to download, "adopted" for a verified file a killed run left without a row, or None (skip)."""
    try:
        item = parse_record(record, diagnosis, run.cfg.licenses)
    except SkipImage as err:
        run.skip(str(record.get("isic_id") if isinstance(record, dict) else record)[:80], err, diagnosis)
        return None
    if item.isic_id in run.log or item.isic_id in in_flight:
        return None
    orphans = _candidates(run.root / "images", item.isic_id)
    if len(orphans) == 1 and _decodes(orphans[0]):
        digest = sha256_file(orphans[0])
        if run.journal.digests().get(item.isic_id) == digest:
            try:
                row = settle_license(item.row, orphans[0], run.cfg.licenses)
            except SkipImage:
                return item
            run.log.append(file_columns(row, orphans[0], item.size, digest))
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


def _settle(run: DownloadRun, item: ImageToFetch, future: Future, diagnosis: str) -> int:
    """Record a finished download: append its row (1) or note why it was skipped (0)."""
    try:
        row = future.result()
    except SkipImage as err:
        run.skip(item.isic_id, err, diagnosis)
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
