"""``stda fetch``: download benign and malignant images from the ISIC Archive into the real-image folder.

    stda fetch --out real/ --limit 500                            # 500 benign + 500 malignant, dermoscopic
    stda fetch --out real/ --licenses CC-0 CC-BY --dry-run        # counts per class and licence, no download

The client speaks the ISIC Archive API v2 (``https://api.isic-archive.com/api/v2/``): ``images/search/`` with a
query in the archive's query language, at most 100 results a page, following the ``next`` cursor;
``images/{isic_id}/`` for a fresh download URL; ``images/facets/`` for dry-run counts. Record fields as the
archive's own code defines them (ImageMarkup/isic ``isic/core/api/image.py``, isic-metadata ``FIELD_REGISTRY``):
``isic_id``, ``copyright_license``, ``attribution``, ``files.full.{url,size}``, and ``metadata.acquisition``
(``image_type``, ``pixels_x``, ...) and ``metadata.clinical`` (``diagnosis_1``, ``lesion_id``, ``patient_id``,
...).

Downloads run in a bounded thread pool. 429 and 5xx answers, timeouts and broken transfers are retried with
exponential backoff and jitter, honouring ``Retry-After``. Each file is streamed to a staging name, checked
against the size the API states and decoded, and only then renamed into ``images/``; its ``metadata.csv`` row
is appended after that. An interrupted run therefore leaves a usable folder, and re-running the same command
continues where it stopped. Download URLs are signed and short-lived: they are never stored or logged (an
expired one is refreshed from the API), only ISIC ids are.
"""

from __future__ import annotations

import contextlib
import csv
import email.utils
import io
import logging
import math
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import yaml
from PIL import Image

from .config import config_to_dict, dump_config
from .errors import BadImageError, StdaError
from .fileio import append_text, atomic_write, drop_torn_tail, write_text
from .images import IMAGE_EXTENSIONS, SkipReport, load_image
from .licenses import LICENSES, write_attribution
from .real import REQUIRED_COLUMNS
from .utils import progress

try:  # POSIX: keep two fetches from writing into one folder at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

ISIC_API_URL = "https://api.isic-archive.com/api/v2/"
ISIC_ID = re.compile(r"ISIC_[0-9]{7}")
"""What an ISIC id looks like; anything else is refused before it is used in a file name."""
DIAGNOSES = {"benign": "Benign", "malignant": "Malignant", "indeterminate": "Indeterminate"}
"""Class name -> the archive's ``diagnosis_1`` value (the top of its diagnosis hierarchy)."""
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp", "WEBP": "webp"}
EXPIRED_STATUS = frozenset({400, 401, 403, 410})
"""What S3 and CloudFront answer for an expired or otherwise refused signed URL."""
MAX_URL_REFRESHES = 2
CHUNK_BYTES = 1 << 20
SELECTION = ("api_url", "query", "collections", "image_type", "licenses", "include_indeterminate")
"""Settings that decide which images a folder holds; a resumed fetch must keep them."""
SETTINGS_FILE = "fetch.yaml"
SKIPPED_FILE = "fetch_skipped.json"
STAGING_DIR = ".incoming"
_QUERY_SECRET = re.compile(r"\?[^\s'\"<>)]*")


@dataclass
class FetchConfig:
    """Settings of ``stda fetch``."""

    api_url: str = ISIC_API_URL  # ISIC Archive API v2 base URL
    query: str = ""  # extra filter in the archive's query language, e.g. 'age_approx:[30 TO 60]'
    collections: tuple[int, ...] = ()  # only images in these collection ids
    image_type: str = "dermoscopic"  # image_type to fetch; "" for every type
    licenses: tuple[str, ...] = tuple(LICENSES)  # licences to accept; CC-BY-NC forbids commercial use
    include_indeterminate: bool = False  # also fetch diagnosis_1 Indeterminate (kept, never trained on)
    limit: int = 0  # at most this many images per class (0: every match)
    workers: int = 8  # parallel downloads
    page_size: int = 100  # search results per page (the API allows 1-100)
    timeout: float = 60.0  # seconds to wait for a connection or for the next bytes of an answer
    retries: int = 6  # further tries after a 429, a 5xx, a timeout or a broken transfer
    backoff: float = 1.0  # seconds before the first retry; doubles each try, with jitter
    max_backoff: float = 120.0  # longest wait between two tries, Retry-After included

    def __post_init__(self) -> None:
        if urlsplit(self.api_url).scheme not in ("http", "https") or not urlsplit(self.api_url).netloc:
            raise StdaError(
                f"--api-url {self.api_url!r} is not an http(s) URL; the default is {ISIC_API_URL}"
            )
        self.api_url = self.api_url.rstrip("/") + "/"
        unknown = sorted(set(self.licenses) - set(LICENSES))
        if unknown or not self.licenses:
            raise StdaError(f"--licenses {list(self.licenses)}: choose one or more of {list(LICENSES)}")
        self.licenses = tuple(sorted(set(self.licenses), key=list(LICENSES).index))
        self.collections = tuple(sorted({int(c) for c in self.collections}))
        if '"' in self.image_type:
            raise StdaError(f"--image-type {self.image_type!r} must not contain a double quote")
        for name, low, high in (("page_size", 1, 100), ("workers", 1, 64), ("retries", 0, 100)):
            if not low <= getattr(self, name) <= high:
                flag = "--" + name.replace("_", "-")
                raise StdaError(f"{flag} {getattr(self, name)} must be between {low} and {high}")
        if self.limit < 0:
            raise StdaError(f"--limit {self.limit} must be 0 (every match) or a positive number per class")
        if self.timeout <= 0 or self.backoff < 0 or self.max_backoff < self.backoff:
            raise StdaError(
                f"--timeout {self.timeout} must be > 0 and 0 <= --backoff {self.backoff} <= "
                f"--max-backoff {self.max_backoff}"
            )

    @property
    def diagnoses(self) -> dict[str, str]:
        """Class name -> ``diagnosis_1`` value of every class this fetch selects."""
        names = list(DIAGNOSES) if self.include_indeterminate else ["benign", "malignant"]
        return {name: DIAGNOSES[name] for name in names}


def build_query(cfg: FetchConfig, diagnosis: str) -> str:
    """The archive query selecting one ``diagnosis_1`` value with the image type, licence and user filters."""
    parts = [f"diagnosis_1:{diagnosis}"]
    if cfg.image_type:
        parts.append(f"image_type:{_quote(cfg.image_type)}")
    parts.append("(" + " OR ".join(f"copyright_license:{lic}" for lic in cfg.licenses) + ")")
    if cfg.query.strip():
        parts.append(f"({cfg.query.strip()})")
    return " AND ".join(parts)


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_*-]+", value) else f'"{value}"'


# ----------------------------------------------------------------------------------------------------------------
# HTTP with retries


class _Retry(Exception):
    """A transient failure (429, 5xx, timeout, broken transfer): wait and try again."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _GaveUp(Exception):
    """Every try failed transiently."""


class _Expired(Exception):
    """The signed download URL was refused (expired): ask the API for a fresh one."""


class _Stopped(Exception):
    """The run is being interrupted; workers give up at once."""


class SkipImage(Exception):
    """One image cannot be fetched (refused id, corrupt file, ...); the run records it and goes on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


def redact(text: str) -> str:
    """``text`` with every URL query string (where signed URLs keep their credentials) removed."""
    return _QUERY_SECRET.sub("?<redacted>", str(text))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date); None when absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: ``d = min(cap, base * 2**attempt)``, a uniform wait in [d/2, d]."""
    d = min(cap, base * 2**attempt)
    return d / 2 + rng.uniform(0, d / 2)


class _RedactQueries(logging.Filter):
    """Strip query strings from a logger's messages (urllib3 logs full request URLs at DEBUG level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def _redact_http_debug_logs() -> None:
    pool_logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RedactQueries) for f in pool_logger.filters):
        pool_logger.addFilter(_RedactQueries())


class IsicClient:
    """The ISIC Archive API v2 over HTTP: retries, timeouts, one ``requests.Session`` per thread.

    Parameters
    ----------
    cfg : FetchConfig
        API URL, page size, timeout and retry settings.
    sleep : callable, optional
        ``sleep(seconds)`` between tries; the default waits on :attr:`stop`, so an interrupt ends it.
    """

    def __init__(self, cfg: FetchConfig, sleep: Callable[[float], None] | None = None):
        self.cfg = cfg
        self.stop = threading.Event()
        self._sleep = sleep or self._wait
        self._rng = random.Random()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        _redact_http_debug_logs()

    def __enter__(self) -> IsicClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's session."""
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = "stda-hf-fetch"
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Stopped()

    def _retrying(self, what: str, attempt: Callable[[], object]):
        last = ""
        for n in range(self.cfg.retries + 1):
            if self.stop.is_set():
                raise _Stopped()
            try:
                return attempt()
            except _Retry as err:
                last = err.reason
                if n == self.cfg.retries:
                    break
                if err.retry_after is not None:
                    delay = min(err.retry_after, self.cfg.max_backoff)
                else:
                    delay = backoff_delay(n, self.cfg.backoff, self.cfg.max_backoff, self._rng)
                logger.debug("%s: %s; try %d of %d in %.2fs", what, last, n + 2, self.cfg.retries + 1, delay)
                self._sleep(delay)
        raise _GaveUp(f"{last} (gave up after {self.cfg.retries + 1} tries)")

    def get_json(self, url: str, params: dict | None = None, missing_ok: bool = False) -> dict | None:
        """GET a JSON object from the API; None for a 404 when ``missing_ok``.

        Raises
        ------
        StdaError
            The API refused the request (bad query, no access, wrong URL) or stayed unreachable after every try.
        """

        def attempt() -> dict | None:
            try:
                r = self._session().get(url, params=params, timeout=self.cfg.timeout)
            except _TRANSIENT_ERRORS as err:
                raise _Retry(redact(err)) from err
            with r:
                if r.status_code == 429 or r.status_code >= 500:
                    raise _Retry(f"HTTP {r.status_code}", retry_after_seconds(r.headers.get("Retry-After")))
                if r.status_code == 404 and missing_ok:
                    return None
                if r.status_code != 200:
                    raise StdaError(
                        f"the ISIC Archive answered HTTP {r.status_code} to {redact(r.url)}: {_excerpt(r)}; "
                        "check --api-url and --query"
                    )
                try:
                    data = r.json()
                except ValueError as err:
                    raise _Retry("the answer is not JSON") from err
            if not isinstance(data, dict):
                raise StdaError(
                    f"{redact(url)} answered {type(data).__name__}, not a JSON object; check --api-url"
                )
            return data

        try:
            return self._retrying(f"GET {redact(url)}", attempt)
        except _GaveUp as err:
            raise StdaError(
                f"could not reach the ISIC Archive at {self.cfg.api_url} ({err}); check the network and "
                "--api-url, then re-run the same command: finished images are kept"
            ) from None

    def _api(self, path: str) -> str:
        return urljoin(self.cfg.api_url, path)

    def _search_params(self, query: str, limit: int) -> dict:
        params = {"query": query, "limit": limit}
        if self.cfg.collections:
            params["collections"] = ",".join(str(c) for c in self.cfg.collections)
        return params

    def count(self, query: str) -> int:
        """How many images match ``query`` (the search answer's ``count``)."""
        page = self.get_json(self._api("images/search/"), self._search_params(query, 1))
        return _int_field(page, "count")

    def search(self, query: str) -> Iterator[dict]:
        """Every image record matching ``query``, page by page, following the ``next`` cursor."""
        url: str | None = self._api("images/search/")
        params: dict | None = self._search_params(query, self.cfg.page_size)
        seen = set()
        while url:
            page = self.get_json(url, params)
            results = page.get("results")
            if not isinstance(results, list):
                raise StdaError(f"{redact(url)}: search answer without a 'results' list; check --api-url")
            yield from results
            nxt = page.get("next")
            if nxt and nxt in seen:
                raise StdaError(
                    f"the archive's next-page cursor repeats ({redact(nxt)}); stopping the search"
                )
            seen.add(nxt)
            url, params = (urljoin(url, nxt) if nxt else None), None

    def facets(self, query: str) -> dict | None:
        """Facet counts (``{field: {"buckets": [{"key", "doc_count"}]}}``) of ``query``; None if unavailable."""
        params = self._search_params(query, 1)
        params.pop("limit")
        try:
            return self.get_json(self._api("images/facets/"), params, missing_ok=True)
        except StdaError as err:
            logger.info("facets unavailable (%s); counting page by page instead", err)
            return None

    def image(self, isic_id: str) -> dict | None:
        """The record of one image (with a fresh download URL); None if the archive does not know it."""
        return self.get_json(self._api(f"images/{_checked_id(isic_id)}/"), missing_ok=True)

    def download(self, url: str, size: int, dest: Path) -> int:
        """Stream ``url`` to ``dest`` atomically, insisting on exactly ``size`` bytes; return the byte count.

        Raises
        ------
        _Expired
            The signed URL was refused: fetch a fresh one with :meth:`image`.
        SkipImage
            The file is gone, or every try failed.
        """

        def attempt() -> int:
            try:
                with self._session().get(url, stream=True, timeout=self.cfg.timeout) as r:
                    return self._save(r, size, dest)
            except _TRANSIENT_ERRORS as err:
                raise _Retry(redact(err)) from err

        try:
            return self._retrying(f"download {dest.stem}", attempt)
        except _GaveUp as err:
            raise SkipImage(f"download failed: {err}") from None

    def _save(self, r: requests.Response, size: int, dest: Path) -> int:
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retry(f"HTTP {r.status_code}", retry_after_seconds(r.headers.get("Retry-After")))
        if r.status_code in EXPIRED_STATUS:
            raise _Expired(f"HTTP {r.status_code}")
        if r.status_code != 200:
            raise SkipImage(f"the file server answered HTTP {r.status_code}")
        n = 0
        with atomic_write(dest, "wb") as fh:
            for chunk in r.iter_content(CHUNK_BYTES):
                if self.stop.is_set():
                    raise _Stopped()
                fh.write(chunk)
                n += len(chunk)
                if n > size:
                    raise _Retry(f"more bytes than the {size} the API states")
            if n != size:
                raise _Retry(f"got {n} of the {size} bytes the API states")
        return n


def _excerpt(r: requests.Response) -> str:
    text = " ".join(r.text[:300].split())
    return redact(text) or "(empty answer)"


def _int_field(obj: dict, key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StdaError(f"the ISIC Archive answer has no valid {key!r} (got {value!r}); check --api-url")
    return value


def _checked_id(isic_id: object) -> str:
    if not isinstance(isic_id, str) or not ISIC_ID.fullmatch(isic_id):
        raise SkipImage(f"refused image id {str(isic_id)[:80]!r}: not 'ISIC_' plus seven digits")
    return isic_id


# ----------------------------------------------------------------------------------------------------------------
# Records -> rows


@dataclass(frozen=True)
class _Item:
    """One image to fetch: its id, where to download it (never stored) and its metadata row."""

    isic_id: str
    url: str
    size: int
    row: dict[str, str] = field(repr=False)


def parse_record(record: object, diagnosis: str, licenses: tuple[str, ...]) -> _Item:
    """Validate one search record against the selection and turn it into an item with its metadata row.

    Raises
    ------
    SkipImage
        Unsafe id, licence or diagnosis outside the selection, or no full-size file in the record.
    """
    if not isinstance(record, dict):
        raise SkipImage(f"search result is not a record: {str(record)[:80]!r}")
    isic_id = _checked_id(record.get("isic_id"))
    row = metadata_row(record)
    if row["copyright_license"] not in licenses:
        raise SkipImage(f"licence {row['copyright_license']!r} is not among the accepted {list(licenses)}")
    if row["diagnosis_1"] != diagnosis:
        raise SkipImage(f"diagnosis_1 is {row['diagnosis_1']!r}, the search asked for {diagnosis!r}")
    url, size = _full_file(record)
    return _Item(isic_id, url, size, row)


def _full_file(record: dict) -> tuple[str, int]:
    files = record.get("files")
    full = files.get("full") if isinstance(files, dict) else None
    url, size = (full.get("url"), full.get("size")) if isinstance(full, dict) else (None, None)
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise SkipImage("the record has no http(s) URL in files.full.url")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise SkipImage(f"the record states no valid files.full.size ({size!r})")
    return url, size


def metadata_row(record: dict) -> dict[str, str]:
    """The ``metadata.csv`` row of a record: id, licence, attribution, then the flattened acquisition and
    clinical metadata (isic-cli's columns). URLs and file information are not part of it."""
    row = dict.fromkeys(REQUIRED_COLUMNS, "")
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    for section in ("acquisition", "clinical"):
        values = metadata.get(section) or {}
        if not isinstance(values, dict):
            raise SkipImage(f"metadata.{section} is not a mapping")
        row.update({_cell(k): _cell(v) for k, v in values.items()})
    row["isic_id"] = _cell(record.get("isic_id"))
    row["copyright_license"] = _cell(record.get("copyright_license")) or "unknown"
    row["attribution"] = _cell(record.get("attribution")) or "unknown"
    return row


def _cell(value: object) -> str:
    """One CSV cell on one line (a row never spans lines, so a torn last row is simply a line without end)."""
    text = "" if value is None else str(value)
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


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
        with open(self.path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
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
        with open(self.path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                yield {k: row[k] for k in ("isic_id", "copyright_license", "attribution")}

    def _format(self, row: dict, header: bool) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerow(row)
        return buf.getvalue()

    def _rewrite(self) -> None:
        """Stream the file into a new one with the current columns, keeping each known id's first row."""
        seen = set()
        with open(self.path, newline="", encoding="utf-8") as src, atomic_write(self.path, "w") as dst:
            writer = csv.DictWriter(dst, fieldnames=self.columns, restval="", lineterminator="\n")
            writer.writeheader()
            for row in csv.DictReader(src):
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
    with open(path, newline="", encoding="utf-8") as fh:
        counts = Counter(row.get("diagnosis_1") for row in csv.DictReader(fh))
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


def accept_download(staging: Path, images: Path, isic_id: str) -> Path:
    """Decode a downloaded file and rename it to ``images/<isic_id>.<ext>``; a bad file is deleted.

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
    final = images / f"{_checked_id(isic_id)}.{ext}"
    for other in _candidates(images, isic_id):
        if other != final:
            other.unlink(missing_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    return final


def _candidates(images: Path, isic_id: str) -> list[Path]:
    """Existing files ``images/<isic_id>.<ext>`` (looked up by name: no directory scan per image)."""
    return [
        images / f"{isic_id}.{ext}"
        for ext in FORMAT_EXTENSIONS.values()
        if (images / f"{isic_id}.{ext}").exists()
    ]


def fetch_one(client: IsicClient, item: _Item, root: Path) -> int:
    """Download, verify and file one image (run in a worker thread); return its byte count.

    An expired URL is replaced by a fresh one from ``images/{isic_id}/`` (at most :data:`MAX_URL_REFRESHES`
    times).
    """
    url, size = item.url, item.size
    staging = root / STAGING_DIR / f"{item.isic_id}.download"
    for refresh in range(MAX_URL_REFRESHES + 1):
        try:
            n = client.download(url, size, staging)
            break
        except _Expired as err:
            if refresh == MAX_URL_REFRESHES:
                raise SkipImage(f"download URL refused ({err}) even after refreshing it") from None
            try:
                record = client.image(item.isic_id)
            except StdaError as refused:
                raise SkipImage(f"could not refresh the download URL: {refused}") from None
            if record is None:
                raise SkipImage("the archive no longer knows this image") from None
            url, size = _full_file(record)
            logger.debug("%s: download URL expired (%s); refreshed it", item.isic_id, err)
    accept_download(staging, root / "images", item.isic_id)
    return n


# ----------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class FetchResult:
    """What one ``stda fetch`` run did."""

    out: Path
    per_class: dict[str, int]  # images on disk per class after the run
    downloaded: int  # files downloaded by this run
    adopted: int  # verified files a killed run left without a row, kept without downloading again
    bytes: int  # bytes downloaded by this run
    skipped: dict[str, str]  # id -> why it was not fetched

    def format(self) -> str:
        """A short human-readable summary."""
        lines = [
            f"{self.out}: " + ", ".join(f"{k} {v}" for k, v in self.per_class.items()) + " images on disk",
            f"  this run: {self.downloaded} downloaded ({_human_bytes(self.bytes)}), {self.adopted} kept from "
            f"an interrupted run, {len(self.skipped)} skipped",
        ]
        lines += [f"    skipped {k}: {v}" for k, v in sorted(self.skipped.items())[:20]]
        if len(self.skipped) > 20:
            lines.append(f"    ... and {len(self.skipped) - 20} more, see {self.out / SKIPPED_FILE}")
        if self.skipped:
            lines.append("  re-run the same command to retry the skipped images")
        return "\n".join(lines)


@dataclass
class _Run:
    cfg: FetchConfig
    root: Path
    client: IsicClient
    log: MetadataLog
    pool: ThreadPoolExecutor
    bar: object
    report: SkipReport = field(default_factory=SkipReport)
    downloaded: int = 0
    adopted: int = 0
    bytes: int = 0


def fetch(out: str | Path, cfg: FetchConfig | None = None, client: IsicClient | None = None) -> FetchResult:
    """Download the images ``cfg`` selects into the real-image folder ``out``; resume what is there.

    Parameters
    ----------
    out : path
        Output folder: ``images/<isic_id>.<ext>``, ``metadata.csv`` (appended as images finish),
        ``ATTRIBUTION.md``, ``LICENSES/``, ``fetch.yaml`` (settings) and ``fetch_skipped.json``.
    cfg : FetchConfig, optional
        Selection, concurrency and retry settings.
    client : IsicClient, optional
        A client to use (tests pass one with a recording ``sleep``); closed at the end.

    Returns
    -------
    FetchResult
        Counts of this run and of the folder.

    Raises
    ------
    StdaError
        The folder holds another selection or another kind of data, another fetch is writing to it, the API
        refused the query or stayed unreachable, or the disk is full. Finished images are kept in every case.
    """
    cfg = cfg or FetchConfig()
    root = Path(out)
    with _exclusive(root):
        _check_selection(root, cfg)
        dump_config(cfg, root / SETTINGS_FILE)
        _clear_staging(root)
        log = MetadataLog(root)
        with client or IsicClient(cfg) as cl, ThreadPoolExecutor(cfg.workers, "stda-fetch") as pool:
            todo = {d: _todo(cl, cfg, log, d) for d in cfg.diagnoses.values()}
            bar = progress(total=sum(todo.values()), desc="fetch", unit="img")
            run = _Run(cfg, root, cl, log, pool, bar)
            try:
                for diagnosis in cfg.diagnoses.values():
                    _fetch_class(run, diagnosis)
            except BaseException:
                cl.stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                bar.close()
                _finish_folder(run)
    return FetchResult(
        out=root,
        per_class={name: log.count(d) for name, d in cfg.diagnoses.items()},
        downloaded=run.downloaded,
        adopted=run.adopted,
        bytes=run.bytes,
        skipped=dict(run.report.skipped),
    )


def _todo(client: IsicClient, cfg: FetchConfig, log: MetadataLog, diagnosis: str) -> int:
    matches = client.count(build_query(cfg, diagnosis))
    want = min(matches, cfg.limit) if cfg.limit else matches
    return max(0, want - log.count(diagnosis))


def _fetch_class(run: _Run, diagnosis: str) -> None:
    """Keep at most ``2 * workers`` downloads in flight until the class has ``limit`` images or none are left."""
    want = run.cfg.limit or math.inf
    done = run.log.count(diagnosis)
    records = run.client.search(build_query(run.cfg, diagnosis))
    pending: dict[Future, _Item] = {}
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
            elif item is not None:
                pending[run.pool.submit(fetch_one, run.client, item, run.root)] = item
        if not pending:
            return
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            done += _settle(run, pending.pop(future), future)


def _admit(run: _Run, record: object, diagnosis: str, in_flight: set[str]) -> _Item | str | None:
    """An item to download, "adopted" for a verified file a killed run left without a row, or None (skip)."""
    try:
        item = parse_record(record, diagnosis, run.cfg.licenses)
    except SkipImage as err:
        key = record.get("isic_id") if isinstance(record, dict) else record
        run.report.add(str(key)[:80], err.reason)
        return None
    if item.isic_id in run.log or item.isic_id in in_flight:
        return None
    orphans = _candidates(run.root / "images", item.isic_id)
    if len(orphans) == 1 and orphans[0].stat().st_size == item.size and _decodes(orphans[0]):
        run.log.append(item.row)
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


def _settle(run: _Run, item: _Item, future: Future) -> int:
    """Record a finished download: append its row (1) or note why it was skipped (0)."""
    try:
        n = future.result()
    except SkipImage as err:
        run.report.add(item.isic_id, err.reason)
        run.bar.update(1)
        run.bar.set_postfix_str(f"{_human_bytes(run.bytes)}, {len(run.report)} skipped", refresh=False)
        return 0
    run.log.append(item.row)
    run.downloaded += 1
    run.bytes += n
    run.bar.update(1)
    run.bar.set_postfix_str(f"{_human_bytes(run.bytes)}, {len(run.report)} skipped", refresh=False)
    return 1


def _finish_folder(run: _Run) -> None:
    """Attribution, licence texts and the skip report: written at the end of every run, interrupted or not."""
    if len(run.log):
        write_attribution(
            run.root, run.log.attribution_rows(), title="Attribution: images from the ISIC Archive"
        )
    run.report.save(run.root / SKIPPED_FILE)
    with contextlib.suppress(OSError):
        (run.root / STAGING_DIR).rmdir()
    if (run.root / "splits.csv").exists() and run.downloaded + run.adopted:
        logger.warning("%s: new images arrived after `stda split`; run it again", run.root)
    logger.info("%s", run.report.summary())


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".fetch.lock", "w") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StdaError(
                    f"another `stda fetch` is writing to {root}; wait for it to finish or use another --out"
                ) from None
        yield


def _check_selection(root: Path, cfg: FetchConfig) -> None:
    """Refuse to mix selections in one folder, or to write into a folder another tool made."""
    settings = root / SETTINGS_FILE
    if not settings.exists():
        if (root / "metadata.csv").exists():
            raise StdaError(
                f"{root} holds a real-image folder that `stda fetch` did not write; use another --out"
            )
        return
    change = selection_change(root, cfg)
    if change:
        raise StdaError(
            f"{root} was fetched with another selection ({change}); re-run with the same settings to resume, "
            "or use another --out"
        )


def selection_change(root: str | Path, cfg: FetchConfig) -> str | None:
    """How ``cfg`` selects other images than the fetch that wrote ``root`` (None: same selection, or none yet)."""
    settings = Path(root) / SETTINGS_FILE
    if not settings.exists():
        return None
    try:
        before = yaml.safe_load(settings.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise StdaError(
            f"{settings} is not valid YAML ({err}); delete it to start the folder afresh"
        ) from err
    now = config_to_dict(cfg)
    changed = [k for k in SELECTION if k in before and before[k] != now[k]]
    return "; ".join(f"{k}: {before[k]!r} before, {now[k]!r} now" for k in changed) or None


def _clear_staging(root: Path) -> None:
    staging = root / STAGING_DIR
    if staging.is_dir():
        for p in staging.iterdir():
            p.unlink(missing_ok=True)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------------------------------------------
# Dry run


@dataclass
class DryRun:
    """How many images a fetch would select, per class and licence."""

    queries: dict[str, str]  # class -> archive query
    counts: dict[str, dict[str, int]]  # class -> licence -> matching images
    totals: dict[str, int]  # class -> matching images
    on_disk: dict[str, int]  # class -> images already in the output folder
    limit: int
    method: str  # "facets" (one request per class) or "paging" (metadata only, no files)
    note: str = ""  # e.g. that the output folder holds another selection

    def format(self) -> str:
        """A table: class, matches per licence, total, what a fetch would download."""
        licenses = sorted({lic for c in self.counts.values() for lic in c})
        head = f"{'class':<14}" + "".join(f"{lic:>10}" for lic in licenses) + f"{'total':>10}{'to fetch':>10}"
        lines = [head]
        for name, total in self.totals.items():
            want = min(total, self.limit) if self.limit else total
            lines.append(
                f"{name:<14}"
                + "".join(f"{self.counts[name].get(lic, 0):>10}" for lic in licenses)
                + f"{total:>10}{max(0, want - self.on_disk.get(name, 0)):>10}"
            )
        lines.append(f"(counted by {self.method}; queries:)")
        lines += [f"  {name}: {q}" for name, q in self.queries.items()]
        return "\n".join(lines + ([self.note] if self.note else []))


def dry_run(cfg: FetchConfig | None = None, out: str | Path | None = None) -> DryRun:
    """Count what ``cfg`` selects per class and licence without downloading any image file.

    Uses the archive's facets when it offers them, otherwise pages through the search results (metadata only).
    """
    cfg = cfg or FetchConfig()
    on_disk, note = {}, ""
    if out is not None:
        change = selection_change(out, cfg)
        if change:
            note = f"{out} holds another selection ({change}): a fetch into it would be refused"
        else:
            on_disk = count_on_disk(out, cfg.diagnoses)
    queries = {name: build_query(cfg, d) for name, d in cfg.diagnoses.items()}
    counts, totals, methods = {}, {}, set()
    with IsicClient(cfg) as client:
        for name, query in queries.items():
            totals[name] = client.count(query)
            counts[name], method = _license_counts(client, query, totals[name])
            methods.add(method)
    return DryRun(queries, counts, totals, on_disk, cfg.limit, "+".join(sorted(methods)), note)


def _license_counts(client: IsicClient, query: str, total: int) -> tuple[dict[str, int], str]:
    facets = client.facets(query)
    buckets = ((facets or {}).get("copyright_license") or {}).get("buckets")
    if isinstance(buckets, list) and all(isinstance(b, dict) and "key" in b for b in buckets):
        return {str(b["key"]): int(b.get("doc_count", 0)) for b in buckets if b.get("doc_count")}, "facets"
    counts: Counter = Counter()
    for record in progress(client.search(query), total=total, desc="count", unit="img"):
        counts[str(record.get("copyright_license", "unknown"))] += 1
    return dict(sorted(counts.items())), "paging"
