"""The ISIC Archive API v2 as ``stda fetch`` uses it: the selection and its query, the client, the records.

The client speaks the API (``https://api.isic-archive.com/api/v2/``) as the archive's own code
(ImageMarkup/isic) serves it: ``images/search/`` with a query in the archive's query language
(``isic/core/dsl.py``), at most 100 results a page in creation order, following the ``next`` cursor (``count``
comes on the first page only); ``images/search/size/`` for the stated bytes of a selection; ``images/facets/``
for dry-run counts; ``collections/{id}/`` (404 for an unknown or private collection, which a search would
silently treat as empty); ``images/{isic_id}/`` for a fresh URL. Record fields as ``isic/core/api/image.py``
defines them: ``isic_id``, ``copyright_license``, ``attribution`` (the cohort's default), ``files.full.{url,size}``
and ``metadata.acquisition`` / ``metadata.clinical``. Retries, timeouts, deadlines, size caps, checked
redirects and redaction come from :mod:`stda_hf.fetch.http`; URLs are never stored or logged, only ISIC ids.

Hosts: API requests, their redirects and every ``next`` link stay on ``--api-url``'s origin; a file may come
from that origin, from the archive's storage bucket (:data:`BUCKET_HOST`: ``isic-archive.s3.amazonaws.com`` and
its regional names, https only) and from the origins listed in ``--file-hosts``; a file URL or redirect
anywhere else is refused and the file skipped.
"""

from __future__ import annotations

import hashlib
import json
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
    GaveUp,
    Refused,
    Retry,
    RetryingClient,
    RetryPolicy,
    check_url,
    origin,
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
SAMPLES = ("oldest", "random")
METADATA_MARGIN = 8192
"""Bytes a served file may exceed its stated ``files.full.size`` by: the cap of every file is stated + this.

The archive states the size recorded at ingest, then embeds IPTC/XMP credit and licence into every JPEG when it
publishes it (``isic/ingest/services/publish/__init__.py`` ``embed_iptc_metadata``, pyexiv2 2.15.5) and never
updates the stated size. Re-running that call measured ``served = stated + 3149 + len(credit in UTF-8)`` bytes
whatever the image size: 3158-3251 for typical credits, at most 3949 for the longest credit the archive allows
(200 characters, 800 bytes); PNG and TIFF files are served as stated. 8192 is twice that worst case, slack for
another exiv2 version's padding, and a body past it is not an image with metadata but something else."""
BUCKET_HOST = re.compile(r"isic-archive\.s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com")
"""The archive's public storage bucket (``images/<id>.jpg``), global or regional names; accepted over https."""
MAX_API_BYTES = 32 << 20
"""Cap of one API answer (a page of 100 records is about 0.2 MB)."""


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
    timeout: float = 30.0  # seconds to wait for a connection or for the next bytes of an answer
    deadline: float = 300.0  # seconds one try of one file or API page may take in all (a trickle is retried)
    retries: int = 6  # further tries after a 429, a 5xx, a timeout, a broken or corrupt transfer
    backoff: float = 1.0  # seconds before the first retry; doubles each try, with jitter
    max_backoff: float = 120.0  # longest wait between two tries, Retry-After included
    file_hosts: tuple[str, ...] = ()  # more origins (https://host[:port]) files may come from, e.g. a mirror

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
        seconds = (self.timeout, self.deadline, self.backoff, self.max_backoff)
        if not all(math.isfinite(v) for v in seconds):
            raise StdaError(
                f"--timeout {self.timeout}, --deadline {self.deadline}, --backoff {self.backoff} and "
                f"--max-backoff {self.max_backoff} must be finite numbers of seconds"
            )
        if self.timeout <= 0 or self.deadline <= 0 or self.backoff < 0 or self.max_backoff < self.backoff:
            raise StdaError(
                f"--timeout {self.timeout} and --deadline {self.deadline} must be > 0 and 0 <= --backoff "
                f"{self.backoff} <= --max-backoff {self.max_backoff}"
            )
        hosts = []
        for host in self.file_hosts:
            parts = urlsplit(host if "//" in host else f"https://{host}")
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                raise StdaError(
                    f"--file-hosts {host!r}: give an origin like https://files.example.org[:port]"
                )
            hosts.append(origin(f"{parts.scheme}://{parts.netloc}"))
        self.file_hosts = tuple(sorted(set(hosts)))

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
    (a failed or corrupt download) is tried again on the next run. ``kind`` names the reason in a word the
    run's summary counts by (:data:`SKIP_KINDS`).
    """

    def __init__(self, reason: str, permanent: bool = False, kind: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.kind = kind or ("refused record" if permanent else "transfer")


SKIP_KINDS = {
    "refused record": "records refused (unsafe id, outside the selection)",
    "transfer": "downloads that failed every try",
    "content": "files that do not match their record (not an image, other pixels, another image's id)",
    "too large": "bodies past the size cap",
    "host": "URLs or redirects off the accepted hosts",
    "protocol": "protocol errors (encoding, request refused)",
    "licence": "files embedding a licence outside the selection",
    "server": "files the server refused or no longer has",
}
"""Kinds of skipped images, and what the summary calls them."""


class BadContent(Exception):
    """A downloaded file that does not match its record: retried like a broken transfer, then skipped."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
        policy = RetryPolicy(cfg.timeout, cfg.retries, cfg.deadline, cfg.backoff, cfg.max_backoff)
        super().__init__(policy, sleep, user_agent="stda-hf-fetch")
        self.cfg = cfg
        self.api_origin = origin(cfg.api_url)
        self._file_origins = {self.api_origin, *cfg.file_hosts}

    def accepts_api_url(self, url: str) -> str | None:
        """None when ``url`` is on ``--api-url``'s origin; else why not."""
        if origin(url) != self.api_origin:
            return f"{redact(url)[:120]} is not on the archive's API host {self.api_origin}"
        return None

    def accepts_file_url(self, url: str) -> str | None:
        """None when a file may come from ``url`` (the API's origin, the archive's bucket, ``--file-hosts``);
        else the refused origin and why."""
        parts = urlsplit(url)
        if origin(url) in self._file_origins:
            return None
        if (
            parts.scheme == "https"
            and BUCKET_HOST.fullmatch(parts.hostname or "")
            and parts.port in (None, 443)
        ):
            return None
        return (
            f"{origin(url)}, which is neither the archive's ({self.api_origin}, or https://isic-archive.s3"
            ".amazonaws.com and its regional names) nor in --file-hosts"
        )

    def get_json(self, url: str, params: dict | None = None, missing_ok: bool = False) -> dict | None:
        """GET a JSON object from the API; None for a 404 when ``missing_ok``.

        Raises
        ------
        StdaError
            The API refused the request (bad query, no access, wrong URL) or stayed unreachable after every try.
        """

        def attempt() -> dict | None:
            body = bytearray()
            with self.get(url, self.accepts_api_url, params) as r:
                if retry := transient_status(r):
                    raise retry
                if r.status_code == 404 and missing_ok:
                    return None
                self.read_body(r, body.extend, MAX_API_BYTES)
                status, where = r.status_code, redact(r.url)
            text = " ".join(body[:300].decode("utf-8", "replace").split())
            if status != 200:
                raise StdaError(self._refusal(status, where, redact(text) or "(empty answer)", params))
            return _json_object(bytes(body), where, text)

        try:
            return self.retrying(f"GET {redact(url)}", attempt, level=logging.WARNING)
        except GaveUp as err:
            raise StdaError(
                f"could not reach the ISIC Archive at {self.cfg.api_url} ({err}); check the network and "
                "--api-url, then re-run the same command: finished images are kept"
            ) from None
        except Refused as err:
            raise StdaError(f"the ISIC Archive's answer to {redact(url)} was refused: {err.reason}") from None

    def _refusal(self, status: int, where: str, text: str, params: dict | None) -> str:
        """The one-line error for an API answer that is neither 200 nor transient."""
        if status == 422 and "cursor" in text:
            return (
                f"the ISIC Archive refused its own next-page cursor (HTTP 422 to {where}: {text}); re-run the "
                "same command: finished images are kept"
            )
        query = (params or {}).get("query")
        sent = f"; the query sent was {query!r}" if query is not None else ""
        return (
            f"the ISIC Archive answered HTTP {status} to {where}: {text}{sent}; check --api-url and --query "
            "(the archive's query language: README, `stda fetch --help`)"
        )

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
        endpoint = self._api("images/search/")
        url: str | None = endpoint
        params: dict | None = self._search_params(query, self.cfg.page_size)
        seen = set()
        while url:
            page = self.get_json(url, params)
            results = page.get("results")
            if not isinstance(results, list):
                raise StdaError(f"{redact(url)}: search answer without a 'results' list; check --api-url")
            count = page.get("count")
            if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
                raise StdaError(
                    f"{redact(url)}: the search page's 'count' is {count!r}, not a number or null"
                )
            yield from results
            url, params = self._next_page(url, page.get("next"), endpoint, seen), None

    def _next_page(self, url: str, nxt: object, endpoint: str, seen: set[str]) -> str | None:
        """The absolute next-page URL of a search page, checked: text or null, on the search endpoint, new."""
        if nxt is None:
            return None
        if not isinstance(nxt, str) or not nxt:
            raise StdaError(
                f"{redact(url)}: the search page's 'next' is {type(nxt).__name__} {str(nxt)[:40]!r}, not a link "
                "or null; check --api-url"
            )
        try:
            absolute = urljoin(url, nxt)
        except ValueError:  # e.g. an unclosed IPv6 bracket
            absolute = nxt
        if problem := check_url(absolute):
            raise StdaError(f"{redact(url)}: the search page's 'next' link: {problem}; check --api-url")
        if origin(absolute) != self.api_origin or urlsplit(absolute).path != urlsplit(endpoint).path:
            raise StdaError(
                f"the search page's 'next' link {redact(absolute)[:120]} leaves the search endpoint "
                f"{redact(endpoint)}; not following it; check --api-url"
            )
        if absolute in seen:
            raise StdaError(
                f"the archive's next-page cursor repeats ({redact(absolute)}); stopping the search"
            )
        seen.add(absolute)
        return absolute

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

    def download(
        self, url: str, stated: int, dest: Path, verify: Callable[[Path], object] | None = None
    ) -> Download:
        """Stream ``url`` to ``dest`` atomically and check it; retry a broken, short or corrupt transfer.

        The API's ``stated`` size is a floor, and stated + :data:`METADATA_MARGIN` the cap: the archive embeds
        IPTC/XMP metadata into every JPEG after recording its size. The file is then judged by ``verify(dest)``,
        which raises :class:`BadContent` for a file that does not match its record (retried like a short
        transfer: the next answer may be right). Only hosts :meth:`accepts_file_url` accepts are followed.

        Raises
        ------
        UrlExpired
            A signed URL was refused: fetch a fresh one with :meth:`image`.
        SkipImage
            The file is gone, too large, on a refused host, or every try failed; with the reason's kind.
        """

        def attempt() -> Download:
            with self.get(url, self.accepts_file_url) as r:
                got = self._save(r, stated, dest)
            if verify is not None:
                try:
                    verify(dest)
                except BadContent as err:
                    dest.unlink(missing_ok=True)
                    raise Retry(err.reason, kind="content") from None
            return got

        try:
            return self.retrying(f"download {dest.stem}", attempt)
        except GaveUp as err:
            what = "the file does not match its record" if err.kind == "content" else "download failed"
            raise SkipImage(f"{what}: {err}", kind=err.kind) from None
        except Refused as err:
            raise SkipImage(err.reason, kind=err.kind) from None

    def _save(self, r: requests.Response, stated: int, dest: Path) -> Download:
        if retry := transient_status(r):
            raise retry
        if r.status_code in EXPIRED_STATUS:
            raise UrlExpired(f"HTTP {r.status_code}")
        if r.status_code != 200:
            raise SkipImage(f"the file server answered HTTP {r.status_code}", kind="server")
        digest = hashlib.sha256()
        with atomic_write(dest, "wb") as fh:

            def write(chunk: bytes) -> None:
                fh.write(chunk)
                digest.update(chunk)

            n = self.read_body(r, write, stated + METADATA_MARGIN)
            if n < stated:
                raise Retry(f"got {n} bytes, fewer than the {stated} the API states")
        return Download(n, digest.hexdigest())


def _json_object(body: bytes, where: str, text: str) -> dict:
    """The JSON object of an API answer; a one-line :class:`StdaError` for anything else."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise StdaError(
            f"{where} answered JSON nested too deep to be an API answer; check --api-url"
        ) from None
    except ValueError:
        raise StdaError(
            f"{where} answered HTTP 200 with something that is not JSON ({redact(text) or 'empty'}); "
            "check --api-url (it should end in /api/v2/)"
        ) from None
    if not isinstance(data, dict):
        raise StdaError(f"{where} answered {type(data).__name__}, not a JSON object; check --api-url")
    return data


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
    size: int  # what the API states (a floor: the archive embeds metadata after recording it)
    row: dict[str, str] = field(repr=False)
    pixels: tuple[int, int] | None = None  # metadata.acquisition.pixels_x/_y, where the record states them


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
    return ImageToFetch(isic_id, url, size, row, stated_pixels(record))


def stated_pixels(record: dict) -> tuple[int, int] | None:
    """``(pixels_x, pixels_y)`` from ``metadata.acquisition`` when both are positive integers, else None."""
    metadata = record.get("metadata")
    acquisition = metadata.get("acquisition") if isinstance(metadata, dict) else None
    if not isinstance(acquisition, dict):
        return None
    x, y = acquisition.get("pixels_x"), acquisition.get("pixels_y")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (x, y)):
        return x, y
    return None


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
    if check_url(url):
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
