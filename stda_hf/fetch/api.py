"""The ISIC Archive API v2 as ``stda fetch`` uses it: the selection and its query, the client, the records.

The client speaks the API (``https://api.isic-archive.com/api/v2/``) as the archive's own code
(ImageMarkup/isic) serves it: ``images/search/`` with a query in the archive's query language
(``isic/core/dsl.py``), at most 100 results a page in creation order, following the ``next`` cursor (``count``
comes on the first page only); ``images/search/size/`` for the stated bytes of a selection; ``images/facets/``
for dry-run counts; ``collections/{id}/`` (404 for an unknown or private collection, which a search would
silently treat as empty); ``images/{isic_id}/`` for a fresh URL. Record fields as ``isic/core/api/image.py``
defines them: ``isic_id``, ``copyright_license``, ``attribution`` (the cohort's default), ``files.full.{url,size}``
and ``metadata.acquisition`` / ``metadata.clinical``. Retries, timeouts and redaction come from
:mod:`stda_hf.fetch.http`; URLs are never stored or logged, only ISIC ids.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import atomic_write
from stda_hf.data.licenses import LICENSES
from stda_hf.data.real import REQUIRED_COLUMNS
from stda_hf.fetch.http import (
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

logger = logging.getLogger(__name__)

ISIC_API_URL = "https://api.isic-archive.com/api/v2/"
ISIC_ID = re.compile(r"ISIC_[0-9]{7}")
"""What an ISIC id looks like; anything else is refused before it is used in a file name."""
DIAGNOSES = {"benign": "Benign", "malignant": "Malignant", "indeterminate": "Indeterminate"}
"""Class name -> the archive's ``diagnosis_1`` value (the top of its diagnosis hierarchy)."""
EXPIRED_STATUS = frozenset({400, 401, 403, 410})
"""What S3 and CloudFront answer for an expired or otherwise refused signed URL."""
CHUNK_BYTES = 1 << 20
SAMPLES = ("oldest", "random")


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


class UrlExpired(Exception):
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
        return self.get_json(self._api(f"images/{checked_id(isic_id)}/"), missing_ok=True)

    def download(self, url: str, stated: int, dest: Path) -> Download:
        """Stream ``url`` to ``dest`` atomically; the transfer is judged by its own ``Content-Length``.

        The API's ``stated`` size is advisory: the archive embeds IPTC/XMP metadata into every JPEG after
        recording it, so a served file is larger. A file smaller than stated is suspicious and retried.

        Raises
        ------
        UrlExpired
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
            raise UrlExpired(f"HTTP {r.status_code}")
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


def checked_id(isic_id: object) -> str:
    """``isic_id`` when it is an ISIC id (:data:`ISIC_ID`), safe to use in a file name.

    Raises
    ------
    SkipImage
        Permanently: anything else.
    """
    if not isinstance(isic_id, str) or not ISIC_ID.fullmatch(isic_id):
        raise SkipImage(
            f"refused image id {str(isic_id)[:80]!r}: not 'ISIC_' plus seven digits", permanent=True
        )
    return isic_id


# ----------------------------------------------------------------------------------------------------------------
# Records -> rows


@dataclass(frozen=True)
class ImageToFetch:
    """One image to fetch: its id, where to download it (never stored) and its metadata row."""

    isic_id: str
    url: str
    size: int  # what the API states (advisory: the archive embeds metadata after recording it)
    row: dict[str, str] = field(repr=False)


def parse_record(record: object, diagnosis: str, licenses: tuple[str, ...]) -> ImageToFetch:
    """Validate one search record against the selection and turn it into an item with its metadata row.

    Raises
    ------
    SkipImage
        Unsafe id, licence or diagnosis outside the selection, or no full-size file in the record.
    """
    if not isinstance(record, dict):
        raise SkipImage(f"search result is not a record: {str(record)[:80]!r}", permanent=True)
    isic_id = checked_id(record.get("isic_id"))
    row = metadata_row(record)
    if row["copyright_license"] not in licenses:
        raise SkipImage(
            f"licence {row['copyright_license']!r} is not among the accepted {list(licenses)}", permanent=True
        )
    if row["diagnosis_1"] != diagnosis:
        raise SkipImage(
            f"diagnosis_1 is {row['diagnosis_1']!r}, the search asked for {diagnosis!r}", permanent=True
        )
    url, size = full_file(record)
    return ImageToFetch(isic_id, url, size, row)


def full_file(record: dict) -> tuple[str, int]:
    """The download URL and stated size (``files.full.{url,size}``) of an image record.

    Raises
    ------
    SkipImage
        Permanently: no http(s) URL or no positive size in the record.
    """
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
        row.update({csv_cell(k): csv_cell(v) for k, v in values.items()})
    row["isic_id"] = csv_cell(record.get("isic_id"))
    row["copyright_license"] = csv_cell(record.get("copyright_license")) or "unknown"
    row["attribution"] = csv_cell(record.get("attribution")) or "unknown"
    return row


def csv_cell(value: object) -> str:
    """One CSV cell on one line (a row never spans lines, so a torn last row is simply a line without end)."""
    text = "" if value is None else str(value)
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text
