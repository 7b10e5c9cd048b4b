"""``stda fetch``: download benign and malignant images from the ISIC Archive into the real-image folder.

    stda fetch --out real/ --limit 500                            # the 500 oldest benign + 500 malignant
    stda fetch --out real/ --limit 500 --sample random --seed 1   # 500 per class sampled across the archive
    stda fetch --out real/ --licenses CC-0 CC-BY --dry-run        # counts per class and licence, no download

The client speaks the ISIC Archive API v2 (``https://api.isic-archive.com/api/v2/``) as the archive's own code
(ImageMarkup/isic) serves it: ``images/search/`` with a query in the archive's query language
(``isic/core/dsl.py``), at most 100 results a page in creation order, following the ``next`` cursor (``count``
comes on the first page only); ``images/search/size/`` for the stated bytes of a selection; ``images/facets/``
for dry-run counts; ``collections/{id}/`` (404 for an unknown or private collection, which a search would
silently treat as empty); ``images/{isic_id}/`` for a fresh URL. Record fields as ``isic/core/api/image.py``
defines them: ``isic_id``, ``copyright_license``, ``attribution`` (the cohort's default), ``files.full.{url,size}``
and ``metadata.acquisition`` / ``metadata.clinical``.

The archive records ``files.full.size`` at ingest, then embeds IPTC/XMP credit and licence into every JPEG when
it publishes it, so a served JPEG is a few KB larger than stated. A transfer is therefore judged by its own
``Content-Length`` and a full decode; both sizes, the SHA-256 and the embedded credit and licence go into
``metadata.csv``. Downloads run in a bounded thread pool with the retries of :mod:`stda_hf.httpclient`. Each
file is streamed to a staging name, checked and decoded, its digest journalled, and only then renamed into
``images/``; its ``metadata.csv`` row is appended after that. An interrupted run therefore leaves a usable
folder, and re-running the same command continues where it stopped, keeping a finished file without its row
when it decodes and matches its journalled digest. Public file URLs are permanent; a private image's URL is
signed and expires (a refused one is refreshed from the API). URLs are never stored or logged, only ISIC ids.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import json
import logging
import math
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image, IptcImagePlugin

from .config import changed_settings, config_to_dict, dump_config, read_settings
from .errors import BadImageError, StdaError
from .fileio import (
    append_jsonl,
    append_text,
    atomic_write,
    csv_text,
    drop_torn_tail,
    exclusive,
    open_csv,
    read_jsonl,
    write_json,
    write_text,
)
from .httpclient import (
    TRANSIENT_ERRORS,
    GaveUp,
    Retry,
    RetryingClient,
    RetryPolicy,
    Stopped,
    excerpt,
    redact,
    transient_status,
)
from .images import IMAGE_EXTENSIONS, SkipReport, load_image
from .licenses import LICENSES, write_attribution
from .real import REQUIRED_COLUMNS
from .utils import progress

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
METADATA_MARGIN = 8192
"""Bytes per JPEG to add to the archive's stated sizes: what it embeds after ingest (3.2 KB measured)."""
SAMPLES = ("oldest", "random")
SELECTION = (
    "api_url",
    "query",
    "collections",
    "image_type",
    "licenses",
    "include_indeterminate",
    "sample",
    "seed",
)
"""Settings that decide which images a folder holds; a resumed fetch must keep them."""
SETTINGS_FILE = "fetch.yaml"
SKIPPED_FILE = "fetch_skipped.json"
DIGESTS_FILE = ".fetch_digests.jsonl"
"""One line per file renamed into ``images/``: id and SHA-256, written just before the rename."""
STAGING_DIR = ".incoming"


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
    sample: str = "oldest"  # which --limit images: oldest (the archive's creation order) or random (seeded)
    seed: int = 0  # seed of --sample random
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
        if self.sample not in SAMPLES:
            raise StdaError(f"--sample {self.sample!r}: choose one of {list(SAMPLES)}")
        if self.limit < 0:
            raise StdaError(f"--limit {self.limit} must be 0 (every match) or a positive number per class")
        if not all(math.isfinite(v) for v in (self.timeout, self.backoff, self.max_backoff)):
            raise StdaError(
                f"--timeout {self.timeout}, --backoff {self.backoff} and --max-backoff {self.max_backoff} "
                "must be finite numbers of seconds"
            )
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


def build_query(cfg: FetchConfig, diagnosis: str | None) -> str:
    """The archive query selecting one ``diagnosis_1`` value with the image type, licence and user filters.

    ``diagnosis`` None selects the images without any ``diagnosis_1`` (what ``--dry-run`` counts apart).
    """
    parts = [f"diagnosis_1:{diagnosis}" if diagnosis else "-diagnosis_1:*"]
    if cfg.image_type:
        parts.append(f"image_type:{_quote(cfg.image_type)}")
    parts.append("(" + " OR ".join(f"copyright_license:{lic}" for lic in cfg.licenses) + ")")
    if cfg.query.strip():
        parts.append(f"({cfg.query.strip()})")
    return " AND ".join(parts)


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_*-]+", value) else f'"{value}"'


# ----------------------------------------------------------------------------------------------------------------
# The archive's API (on the retrying client of httpclient.py)


class _Expired(Exception):
    """A signed download URL was refused (expired): ask the API for a fresh one."""


class SkipImage(Exception):
    """One image cannot be fetched; the run records it and goes on.

    ``permanent`` marks what a re-run cannot change (an unsafe id, a record outside the selection); the rest
    (a failed or corrupt download) is tried again on the next run.
    """

    def __init__(self, reason: str, permanent: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class Download:
    """A file streamed to disk: its byte count and SHA-256."""

    size: int
    sha256: str


class IsicClient(RetryingClient):
    """The ISIC Archive API v2 over HTTP: retries, timeouts, one ``requests.Session`` per thread.

    Parameters
    ----------
    cfg : FetchConfig
        API URL, page size, collections, timeout and retry settings.
    sleep : callable, optional
        ``sleep(seconds)`` between tries; the default waits on :attr:`stop`, so an interrupt ends it.
    """

    def __init__(self, cfg: FetchConfig, sleep: Callable[[float], None] | None = None):
        policy = RetryPolicy(cfg.timeout, cfg.retries, cfg.backoff, cfg.max_backoff)
        super().__init__(policy, sleep, user_agent="stda-hf-fetch")
        self.cfg = cfg

    def get_json(self, url: str, params: dict | None = None, missing_ok: bool = False) -> dict | None:
        """GET a JSON object from the API; None for a 404 when ``missing_ok``.

        Raises
        ------
        StdaError
            The API refused the request (bad query, no access, wrong URL) or stayed unreachable after every try.
        """

        def attempt() -> dict | None:
            with self.get(url, params=params) as r:
                if retry := transient_status(r):
                    raise retry
                if r.status_code == 404 and missing_ok:
                    return None
                if r.status_code != 200:
                    raise StdaError(
                        f"the ISIC Archive answered HTTP {r.status_code} to {redact(r.url)}: {excerpt(r)}; "
                        "check --api-url and --query (the archive's query language: README, `stda fetch`)"
                    )
                try:
                    data = r.json()
                except ValueError as err:
                    raise Retry("the answer is not JSON") from err
            if not isinstance(data, dict):
                raise StdaError(
                    f"{redact(url)} answered {type(data).__name__}, not a JSON object; check --api-url"
                )
            return data

        try:
            return self.retrying(f"GET {redact(url)}", attempt)
        except GaveUp as err:
            raise StdaError(
                f"could not reach the ISIC Archive at {self.cfg.api_url} ({err}); check the network and "
                "--api-url, then re-run the same command: finished images are kept"
            ) from None

    def _api(self, path: str) -> str:
        return urljoin(self.cfg.api_url, path)

    def _search_params(self, query: str, limit: int | None = None) -> dict:
        params: dict = {"query": query}
        if limit is not None:
            params["limit"] = limit
        if self.cfg.collections:
            params["collections"] = ",".join(str(c) for c in self.cfg.collections)
        return params

    def count(self, query: str) -> int:
        """How many images match ``query`` (``count``, which the archive gives on the first page only)."""
        page = self.get_json(self._api("images/search/"), self._search_params(query, 1))
        return _int_field(page, "count")

    def total_size(self, query: str) -> int | None:
        """The archive's sum of the stated ``files.full.size`` of every match; None where it has no such endpoint."""
        answer = self.get_json(self._api("images/search/size/"), self._search_params(query), missing_ok=True)
        return None if answer is None else _int_field(answer, "size")

    def collection(self, collection_id: int) -> dict | None:
        """The record of one collection; None when the archive does not show it (unknown or private)."""
        return self.get_json(self._api(f"collections/{int(collection_id)}/"), missing_ok=True)

    def search(self, query: str) -> Iterator[dict]:
        """Every image record matching ``query`` in the archive's order (creation), following ``next``."""
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
        try:
            return self.get_json(self._api("images/facets/"), self._search_params(query), missing_ok=True)
        except StdaError as err:
            logger.info("facets unavailable (%s); counting page by page instead", err)
            return None

    def image(self, isic_id: str) -> dict | None:
        """The record of one image (with a fresh download URL); None if the archive does not know it."""
        return self.get_json(self._api(f"images/{_checked_id(isic_id)}/"), missing_ok=True)

    def download(self, url: str, stated: int, dest: Path) -> Download:
        """Stream ``url`` to ``dest`` atomically; the transfer is judged by its own ``Content-Length``.

        The API's ``stated`` size is advisory: the archive embeds IPTC/XMP metadata into every JPEG after
        recording it, so a served file is larger. A file smaller than stated is suspicious and retried.

        Raises
        ------
        _Expired
            A signed URL was refused: fetch a fresh one with :meth:`image`.
        SkipImage
            The file is gone, or every try failed.
        """

        def attempt() -> Download:
            with self.get(url, stream=True) as r:
                try:
                    return self._save(r, stated, dest)
                except TRANSIENT_ERRORS as err:
                    raise Retry(redact(err)) from err

        try:
            return self.retrying(f"download {dest.stem}", attempt)
        except GaveUp as err:
            raise SkipImage(f"download failed: {err}") from None

    def _save(self, r: requests.Response, stated: int, dest: Path) -> Download:
        if retry := transient_status(r):
            raise retry
        if r.status_code in EXPIRED_STATUS:
            raise _Expired(f"HTTP {r.status_code}")
        if r.status_code != 200:
            raise SkipImage(f"the file server answered HTTP {r.status_code}")
        length = r.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        n, digest = 0, hashlib.sha256()
        with atomic_write(dest, "wb") as fh:
            for chunk in r.iter_content(CHUNK_BYTES):
                if self.stop.is_set():
                    raise Stopped()
                fh.write(chunk)
                digest.update(chunk)
                n += len(chunk)
            if expected is not None and n != expected:
                raise Retry(f"got {n} of the {expected} bytes the server announced")
            if n < stated:
                raise Retry(f"got {n} bytes, fewer than the {stated} the API states")
        return Download(n, digest.hexdigest())


def _int_field(obj: dict, key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StdaError(f"the ISIC Archive answer has no valid {key!r} (got {value!r}); check --api-url")
    return value


def _checked_id(isic_id: object) -> str:
    if not isinstance(isic_id, str) or not ISIC_ID.fullmatch(isic_id):
        raise SkipImage(
            f"refused image id {str(isic_id)[:80]!r}: not 'ISIC_' plus seven digits", permanent=True
        )
    return isic_id


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
    return _cell(credit.decode("utf-8", "replace")), _cell(_xmp_text(text, "xmpRights:UsageTerms"))


def _xmp_text(xmp: str, name: str) -> str:
    """One property of an XMP packet, as an element (plain or ``rdf:Alt`` list) or as an attribute."""
    element = re.search(rf"<{name}\b[^>]*>(.*?)</{name}>", xmp, re.S)
    if element:
        item = re.search(r"<rdf:li\b[^>]*>(.*?)</rdf:li>", element.group(1), re.S)
        return html.unescape((item or element).group(1).strip())
    attribute = re.search(rf'\b{name}="([^"]*)"', xmp)
    return html.unescape(attribute.group(1)) if attribute else ""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Records -> rows


@dataclass(frozen=True)
class _Item:
    """One image to fetch: its id, where to download it (never stored) and its metadata row."""

    isic_id: str
    url: str
    size: int  # what the API states (advisory: the archive embeds metadata after recording it)
    row: dict[str, str] = field(repr=False)


def parse_record(record: object, diagnosis: str, licenses: tuple[str, ...]) -> _Item:
    """Validate one search record against the selection and turn it into an item with its metadata row.

    Raises
    ------
    SkipImage
        Unsafe id, licence or diagnosis outside the selection, or no full-size file in the record.
    """
    if not isinstance(record, dict):
        raise SkipImage(f"search result is not a record: {str(record)[:80]!r}", permanent=True)
    isic_id = _checked_id(record.get("isic_id"))
    row = metadata_row(record)
    if row["copyright_license"] not in licenses:
        raise SkipImage(
            f"licence {row['copyright_license']!r} is not among the accepted {list(licenses)}", permanent=True
        )
    if row["diagnosis_1"] != diagnosis:
        raise SkipImage(
            f"diagnosis_1 is {row['diagnosis_1']!r}, the search asked for {diagnosis!r}", permanent=True
        )
    url, size = _full_file(record)
    return _Item(isic_id, url, size, row)


def _full_file(record: dict) -> tuple[str, int]:
    files = record.get("files")
    full = files.get("full") if isinstance(files, dict) else None
    url, size = (full.get("url"), full.get("size")) if isinstance(full, dict) else (None, None)
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise SkipImage("the record has no http(s) URL in files.full.url", permanent=True)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise SkipImage(f"the record states no valid files.full.size ({size!r})", permanent=True)
    return url, size


def metadata_row(record: dict) -> dict[str, str]:
    """The ``metadata.csv`` row of a record: id, licence, attribution, then the flattened acquisition and
    clinical metadata (isic-cli's columns). URLs are not part of it; :func:`file_columns` adds the file's."""
    row = dict.fromkeys(REQUIRED_COLUMNS, "")
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    for section in ("acquisition", "clinical"):
        values = metadata.get(section) or {}
        if not isinstance(values, dict):
            raise SkipImage(f"metadata.{section} is not a mapping", permanent=True)
        row.update({_cell(k): _cell(v) for k, v in values.items()})
    row["isic_id"] = _cell(record.get("isic_id"))
    row["copyright_license"] = _cell(record.get("copyright_license")) or "unknown"
    row["attribution"] = _cell(record.get("attribution")) or "unknown"
    return row


def _cell(value: object) -> str:
    """One CSV cell on one line (a row never spans lines, so a torn last row is simply a line without end)."""
    text = "" if value is None else str(value)
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


FILE_COLUMNS = (
    "api_attribution",
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
        is not the API's (id -> what each says), streamed from the file."""
        credits, licences = 0, {}
        if not self.path.exists():
            return credits, licences
        with open_csv(self.path) as reader:
            for row in reader:
                credit, api = row.get("embedded_credit") or "", row.get("api_attribution") or ""
                credits += bool(credit and api and credit != api)
                embedded = row.get("embedded_license") or ""
                if embedded and embedded != row.get("copyright_license"):
                    licences[row["isic_id"]] = f"embedded {embedded!r}, API {row.get('copyright_license')!r}"
        for isic_id, what in licences.items():
            logger.warning(
                "%s: licence disagreement (%s); the API's licence is the one selected on", isic_id, what
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
    final = images / f"{_checked_id(isic_id)}.{ext}"
    for other in _candidates(images, isic_id):
        if other != final:
            other.unlink(missing_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    if journal is not None:
        journal.record(isic_id, sha256 or file_sha256(staging))
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
    client: IsicClient, item: _Item, root: Path, journal: DigestJournal | None = None
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
            logger.debug("%s: download URL refused (%s); refreshed it", item.isic_id, err)
    final = accept_download(staging, root / "images", item.isic_id, journal, got.sha256)
    if got.size != size:
        logger.debug("%s: %d bytes served, %d stated by the API", item.isic_id, got.size, size)
    return file_columns(item.row, final, size, got.sha256)


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
    refused: set[str] = field(
        default_factory=set
    )  # skipped ids a re-run cannot fetch (unsafe, outside selection)
    credit_differs: int = 0  # images whose embedded credit is not the API's cohort attribution (expected)
    license_differs: dict[str, str] = field(default_factory=dict)  # id -> "embedded X, API Y"

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
        retry = len(set(self.skipped) - self.refused)
        if retry:
            lines.append(f"  re-run the same command to retry the {retry} failed download(s)")
        if self.refused:
            lines.append(f"  {len(self.refused)} record(s) refused for good (a re-run will not fetch them)")
        if self.credit_differs:
            lines.append(
                f"  {self.credit_differs} image(s) embed a credit other than the API's cohort attribution; "
                "ATTRIBUTION.md uses the file's (api_attribution in metadata.csv keeps the API's)"
            )
        for isic_id, what in sorted(self.license_differs.items())[:20]:
            lines.append(f"  licence disagreement {isic_id}: {what}")
        return "\n".join(lines)


@dataclass
class _Run:
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
        The folder holds another selection or another kind of data, another fetch is writing to it, a
        collection id is unknown, the API refused the query or stayed unreachable, or the disk lacks the
        space. Finished images are kept in every case.
    """
    cfg = cfg or FetchConfig()
    root = Path(out)
    with _exclusive(root):
        _check_selection(root, cfg)
        dump_config(cfg, root / SETTINGS_FILE)
        _clear_staging(root)
        log = MetadataLog(root)
        refused = refused_before(root)
        with client or IsicClient(cfg) as cl, ThreadPoolExecutor(cfg.workers, "stda-fetch") as pool:
            check_collections(cl, cfg)
            todo = {d: _todo(cl, cfg, log, d, refused) for d in cfg.diagnoses.values()}
            check_space(cl, cfg, root, todo)
            bar = progress(total=sum(t for _, t in todo.values()), desc="fetch", unit="img")
            run = _Run(cfg, root, cl, log, DigestJournal(root), pool, bar, refused)
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
    credit_differs, license_differs = log.disagreements()
    return FetchResult(
        out=root,
        per_class={name: log.count(d) for name, d in cfg.diagnoses.items()},
        downloaded=run.downloaded,
        adopted=run.adopted,
        bytes=run.bytes,
        skipped=dict(run.report.skipped),
        refused=set(run.report.skipped) & set().union(*run.refused.values()),
        credit_differs=credit_differs,
        license_differs=license_differs,
    )


def check_collections(client: IsicClient, cfg: FetchConfig) -> None:
    """Refuse a collection id the archive does not show: a search would silently filter everything out.

    Raises
    ------
    StdaError
        Naming the first unknown (or private) id.
    """
    for collection_id in cfg.collections:
        if client.collection(collection_id) is None:
            raise StdaError(
                f"--collections {collection_id}: the ISIC Archive has no public collection with this id "
                f"(GET {urljoin(cfg.api_url, f'collections/{collection_id}/')} answered 404); pick ids from "
                f"{urljoin(cfg.api_url, 'collections/')}"
            )


def _todo(
    client: IsicClient, cfg: FetchConfig, log: MetadataLog, diagnosis: str, refused: dict[str, set[str]]
) -> tuple[int, int]:
    """(matches, images still to fetch) of one class; records refused for good are not counted."""
    matches = client.count(build_query(cfg, diagnosis)) - len(refused.get(diagnosis, ()))
    want = min(matches, cfg.limit) if cfg.limit else matches
    return matches, max(0, want - log.count(diagnosis))


def check_space(client: IsicClient, cfg: FetchConfig, root: Path, todo: dict[str, tuple[int, int]]) -> None:
    """Refuse to start when ``root``'s disk cannot hold what is left to fetch.

    The need is the archive's ``images/search/size/`` (which sums the stated, pre-embedding sizes) scaled to
    the images still to fetch, plus :data:`METADATA_MARGIN` per file.

    Raises
    ------
    StdaError
        Saying how much is needed and how much is free.
    """
    need = 0
    for diagnosis, (matches, left) in todo.items():
        if not left or not matches:
            continue
        stated = client.total_size(build_query(cfg, diagnosis))
        if stated is None:
            logger.info("the archive does not report selection sizes; not checking free disk space")
            return
        need += math.ceil(stated * left / matches) + left * METADATA_MARGIN
    free = shutil.disk_usage(root).free
    if need > free:
        images = sum(left for _, left in todo.values())
        raise StdaError(
            f"{root}: the {images} images left to fetch need about {_human_bytes(need)} (the archive's stated "
            f"sizes plus {METADATA_MARGIN} bytes each for the metadata it embeds), but only "
            f"{_human_bytes(free)} is free; free some space, use another --out, or lower --limit"
        )


def sample_key(seed: int, isic_id: str) -> str:
    """Sort key of ``--sample random``: a seeded hash of the id, so a larger --limit keeps the smaller sample."""
    return hashlib.sha256(f"{seed}:{isic_id}".encode()).hexdigest()


def _records(run: _Run, diagnosis: str) -> Iterator[object]:
    """The class's search records in the order ``--limit`` takes them: creation order, or a seeded shuffle."""
    records = run.client.search(build_query(run.cfg, diagnosis))
    if run.cfg.sample == "random" and run.cfg.limit:
        keyed = [
            (sample_key(run.cfg.seed, str(r.get("isic_id") if isinstance(r, dict) else r)), r)
            for r in records
        ]
        return (r for _, r in sorted(keyed, key=lambda kr: kr[0]))
    return records


def _fetch_class(run: _Run, diagnosis: str) -> None:
    """Keep at most ``2 * workers`` downloads in flight until the class has ``limit`` images or none are left."""
    want = run.cfg.limit or math.inf
    done = run.log.count(diagnosis)
    records = _records(run, diagnosis)
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
            elif isinstance(item, _Item):
                pending[run.pool.submit(fetch_one, run.client, item, run.root, run.journal)] = item
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
        key = str(record.get("isic_id") if isinstance(record, dict) else record)[:80]
        run.report.add(key, err.reason)
        if err.permanent:
            run.refused.setdefault(diagnosis, set()).add(key)
        return None
    if item.isic_id in run.log or item.isic_id in in_flight:
        return None
    orphans = _candidates(run.root / "images", item.isic_id)
    if len(orphans) == 1 and _decodes(orphans[0]):
        digest = file_sha256(orphans[0])
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


def _settle(run: _Run, item: _Item, future: Future) -> int:
    """Record a finished download: append its row (1) or note why it was skipped (0)."""
    try:
        row = future.result()
    except SkipImage as err:
        run.report.add(item.isic_id, err.reason)
        run.bar.update(1)
        run.bar.set_postfix_str(f"{_human_bytes(run.bytes)}, {len(run.report)} skipped", refresh=False)
        return 0
    run.log.append(row)
    run.downloaded += 1
    run.bytes += int(row["file_size"])
    run.bar.update(1)
    run.bar.set_postfix_str(f"{_human_bytes(run.bytes)}, {len(run.report)} skipped", refresh=False)
    return 1


def refused_before(root: Path) -> dict[str, set[str]]:
    """``diagnosis_1`` -> ids of the records an earlier run refused for good (from ``fetch_skipped.json``)."""
    path = Path(root) / SKIPPED_FILE
    try:
        refused = json.loads(path.read_text(encoding="utf-8")).get("refused", {})
        return {str(d): {str(i) for i in ids} for d, ids in refused.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _finish_folder(run: _Run) -> None:
    """Attribution, licence texts and the skip report: written at the end of every run, interrupted or not."""
    if len(run.log):
        write_attribution(
            run.root, run.log.attribution_rows(), title="Attribution: images from the ISIC Archive"
        )
    write_json(
        run.root / SKIPPED_FILE,
        {
            "skipped": dict(sorted(run.report.skipped.items())),
            "refused": {d: sorted(ids) for d, ids in sorted(run.refused.items())},
        },
    )
    with contextlib.suppress(OSError):
        (run.root / STAGING_DIR).rmdir()
    if (run.root / "splits.csv").exists() and run.downloaded + run.adopted:
        logger.warning("%s: new images arrived after `stda split`; run it again", run.root)
    logger.info("%s", run.report.summary())


def _exclusive(root: Path) -> contextlib.AbstractContextManager[Path]:
    """Hold ``root``'s fetch lock (the shared :func:`~stda_hf.fileio.exclusive`): one fetch per folder."""
    busy = f"another `stda fetch` is writing to {root}; wait for it to finish or use another --out"
    return exclusive(root, ".fetch.lock", busy)


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
    before = read_settings(Path(root) / SETTINGS_FILE)
    if before is None:
        return None
    now = config_to_dict(cfg)
    changed = changed_settings(before, now, keys=SELECTION, missing_is_change=False)
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
    totals: dict[str, int]  # class -> matching images a fetch can take (records refused for good left out)
    on_disk: dict[str, int]  # class -> images already in the output folder
    limit: int
    method: str  # "facets" (one request per class) or "paging" (metadata only, no files)
    note: str = ""  # e.g. that the output folder holds another selection
    no_diagnosis: int = 0  # images matching every other filter but without any diagnosis_1 (never fetched)
    refused: dict[str, int] = field(
        default_factory=dict
    )  # class -> records refused for good (unsafe id, ...)

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
        lines.append(f"{self.no_diagnosis} matching image(s) have no diagnosis_1 and are never fetched")
        for name, n in self.refused.items():
            if n:
                lines.append(
                    f"{n} {name} record(s) refused for good (unsafe id or outside the selection): not counted"
                )
        lines.append(f"(counted by {self.method}; queries:)")
        lines += [f"  {name}: {q}" for name, q in self.queries.items()]
        return "\n".join(lines + ([self.note] if self.note else []))


def dry_run(cfg: FetchConfig | None = None, out: str | Path | None = None) -> DryRun:
    """Count what ``cfg`` selects per class and licence without downloading any image file.

    Uses the archive's facets when it offers them, otherwise pages through the search results (metadata only,
    leaving out records a fetch would refuse). Records an earlier fetch into ``out`` refused for good are not
    counted either.

    Raises
    ------
    StdaError
        A collection id is unknown, or the API refused the query or stayed unreachable.
    """
    cfg = cfg or FetchConfig()
    on_disk, note, refused_ids = {}, "", {}
    if out is not None:
        change = selection_change(out, cfg)
        if change:
            note = f"{out} holds another selection ({change}): a fetch into it would be refused"
        else:
            on_disk = count_on_disk(out, cfg.diagnoses)
            refused_ids = refused_before(Path(out))
    queries = {name: build_query(cfg, d) for name, d in cfg.diagnoses.items()}
    counts, totals, methods, refused = {}, {}, set(), {}
    with IsicClient(cfg) as client:
        check_collections(client, cfg)
        for name, query in queries.items():
            diagnosis = cfg.diagnoses[name]
            total = client.count(query)
            counts[name], method, unsafe = _license_counts(client, query, total, diagnosis, cfg.licenses)
            refused[name] = unsafe if method == "paging" else len(refused_ids.get(diagnosis, ()))
            totals[name] = total - refused[name]
            methods.add(method)
        no_diagnosis = client.count(build_query(cfg, None))
    return DryRun(
        queries, counts, totals, on_disk, cfg.limit, "+".join(sorted(methods)), note, no_diagnosis, refused
    )


def _license_counts(
    client: IsicClient, query: str, total: int, diagnosis: str, licenses: tuple[str, ...]
) -> tuple[dict[str, int], str, int]:
    """(licence -> images, method, records refused for good): by facets, else by paging the metadata."""
    facets = client.facets(query)
    buckets = ((facets or {}).get("copyright_license") or {}).get("buckets")
    if isinstance(buckets, list) and all(isinstance(b, dict) and "key" in b for b in buckets):
        return {str(b["key"]): int(b.get("doc_count", 0)) for b in buckets if b.get("doc_count")}, "facets", 0
    counts: Counter = Counter()
    refused = 0
    for record in progress(client.search(query), total=total, desc="count", unit="img"):
        try:
            item = parse_record(record, diagnosis, licenses)
        except SkipImage:
            refused += 1
            continue
        counts[item.row["copyright_license"]] += 1
    return dict(sorted(counts.items())), "paging", refused
