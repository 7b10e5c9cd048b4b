"""A local ISIC Archive API v2 on 127.0.0.1 for tests, with fault injection.

It speaks the shapes of the archive's own code (ImageMarkup/isic, ``isic/core/api/image.py``):

* ``GET images/search/?query=&collections=&limit=&cursor=`` -> ``{"count", "next", "previous", "results"}``,
  cursor-paged (``next`` is an absolute URL, None on the last page), ``limit`` at most 100, HTTP 400 for a
  query it cannot parse;
* ``GET images/{isic_id}/`` -> one record, 404 when unknown;
* ``GET images/facets/?query=`` -> ``{field: {"meta": {...}, "buckets": [{"key", "doc_count"}]}}``;
* records ``{"isic_id", "public", "copyright_license", "attribution", "files": {"full": {"url", "size"},
  "thumbnail_256": {...}}, "metadata": {"acquisition": {"image_type", "pixels_x", ...}, "clinical":
  {"diagnosis_1", "lesion_id", "patient_id", ...}}}`` (field placement from isic-metadata's FIELD_REGISTRY);
* signed file URLs ``/s3/<id>.jpg?Expires=&Signature=`` answering 403 (S3's AccessDenied) once expired.

The query language is the subset the client sends: ``field:value``, ``field:"quoted value"``, ``-field:value``,
``AND``, ``OR`` and parentheses.

Faults are queued per request key (``"search"``, ``"image:<id>"``, ``"file:<id>"``) and used one per request:
``"429"`` (with ``Retry-After``), ``"500"``, ``"503"``, ``"slow"`` (answers after the client's timeout),
``"truncate"`` (full ``Content-Length``, half the body, then the connection closes), ``"short"`` (half the
body with a matching ``Content-Length``: only the size check catches it), ``"hold"`` (waits for
:attr:`FakeIsicArchive.release`, then 503). Persistent faults are data: a corrupt JPEG is an image whose
bytes do not decode (:func:`corrupt`), an expired URL is an id in :attr:`FakeIsicArchive.expired_ids`, a
malicious id is a raw record in :attr:`FakeIsicArchive.extra_records`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import json
import re
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

SECRET = b"test-archive-signing-key"
LICENSES = ("CC-0", "CC-BY", "CC-BY-NC")


@dataclass
class ArchiveImage:
    """One image the fake archive holds."""

    isic_id: str
    data: bytes
    copyright_license: str
    attribution: str
    acquisition: dict
    clinical: dict
    collections: tuple[int, ...] = ()

    def value(self, key: str) -> object:
        if key in ("isic_id", "copyright_license"):
            return getattr(self, key)
        return self.acquisition.get(key, self.clinical.get(key))


def corrupt(data: bytes) -> bytes:
    """A JPEG cut in half: the archive states this size, but the file does not decode."""
    return data[: len(data) // 2]


def phantom_archive(folder: Path, n: int = 24, seed: int = 0, size: int = 32) -> list[ArchiveImage]:
    """``n`` archive images made from phantoms (``size`` px): licences cycle, two are Indeterminate, two clinical.

    One lesion per patient and at most two views of it, so a split has enough groups. Ids are
    ``ISIC_0000001`` ...; even-numbered images are in collection 1; image 5 has no lesion id.
    """
    from stda_hf.phantoms import PhantomConfig, make_phantoms

    make_phantoms(
        folder, PhantomConfig(n=n, size=size, seed=seed, max_lesions_per_patient=1, max_images_per_lesion=2)
    )
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    images = []
    for i, row in enumerate(rows, start=1):
        diagnosis = "Indeterminate" if i in (3, 14) else row["diagnosis_1"]
        clinical = {
            "diagnosis_1": diagnosis,
            "lesion_id": row["lesion_id"].replace("PL_", "IL_"),
            "patient_id": row["patient_id"].replace("PP_", "IP_"),
            "age_approx": 30 + i,
            "sex": "female" if i % 2 else "male",
            "melanocytic": True,
            "anatom_site_general": "posterior torso",
        }
        if i == 5:
            del clinical["lesion_id"]
        images.append(
            ArchiveImage(
                isic_id=f"ISIC_{i:07d}",
                data=(folder / "images" / f"{row['isic_id']}.jpg").read_bytes(),
                copyright_license=LICENSES[i % 3],
                attribution=f'Clínica {i % 4}, "Dermatology"\nUnit' if i % 4 == 1 else f"Hospital {i % 4}",
                acquisition={
                    "image_type": "clinical: close-up" if i in (7, 20) else "dermoscopic",
                    "pixels_x": size,
                    "pixels_y": size,
                },
                clinical=clinical,
                collections=(1,) if i % 2 == 0 else (),
            )
        )
    return images


# ----------------------------------------------------------------------------------------------------------------
# The query language subset


_TOKEN = re.compile(r'\s*(\(|\)|AND\b|OR\b|-?[A-Za-z0-9_]+:(?:"[^"]*"|[A-Za-z0-9_*.-]+))')


class QueryError(ValueError):
    pass


def parse_query(query: str):
    """Parse into a predicate over :class:`ArchiveImage` (AND binds tighter than OR)."""
    tokens, pos = [], 0
    query = query.strip()
    while pos < len(query):
        m = _TOKEN.match(query, pos)
        if not m:
            raise QueryError(f"cannot parse query at {query[pos : pos + 20]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens:
        return lambda im: True
    pred, rest = _or(tokens)
    if rest:
        raise QueryError(f"unexpected {rest[0]!r}")
    return pred


def _or(tokens):
    left, tokens = _and(tokens)
    while tokens and tokens[0] == "OR":
        right, tokens = _and(tokens[1:])
        left = (lambda a, b: lambda im: a(im) or b(im))(left, right)
    return left, tokens


def _and(tokens):
    left, tokens = _atom(tokens)
    while tokens and tokens[0] == "AND":
        right, tokens = _atom(tokens[1:])
        left = (lambda a, b: lambda im: a(im) and b(im))(left, right)
    return left, tokens


def _atom(tokens):
    if not tokens:
        raise QueryError("query ends early")
    tok = tokens[0]
    if tok == "(":
        inner, rest = _or(tokens[1:])
        if not rest or rest[0] != ")":
            raise QueryError("missing )")
        return inner, rest[1:]
    if tok in (")", "AND", "OR"):
        raise QueryError(f"unexpected {tok!r}")
    negated = tok.startswith("-")
    key, _, value = tok.lstrip("-").partition(":")
    value = value.strip('"')

    def pred(im: ArchiveImage) -> bool:
        v = im.value(key)
        hit = v is not None and (value == "*" or str(v) == value)
        return hit != negated

    return pred, tokens[1:]


# ----------------------------------------------------------------------------------------------------------------
# The server


@dataclass
class FakeIsicArchive:
    """The archive's state, its faults and what it saw; :meth:`start` serves it on 127.0.0.1."""

    images: list[ArchiveImage]
    extra_records: list[dict] = field(default_factory=list)  # raw records appended to every search
    expired_ids: set[str] = field(default_factory=set)  # search hands out already-expired URLs for these
    facets_enabled: bool = True
    retry_after: str = "2"
    slow_seconds: float = 3.0
    file_latency: float = 0.0  # seconds before each file answer (a network round trip, for benchmarks)
    faults: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    deliveries: Counter = field(default_factory=Counter)  # complete file bodies sent, per id
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, key, status)
    release: threading.Event = field(default_factory=threading.Event)
    closing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.by_id = {im.isic_id: im for im in self.images}

    # -- lifecycle
    def start(self) -> FakeIsicArchive:
        archive = self

        class Handler(_Handler):
            pass

        Handler.archive = archive
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.closing.set()
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def api_url(self) -> str:
        return f"{self.base}/api/v2/"

    # -- faults and bookkeeping
    def fault(self, key: str, *kinds: str) -> None:
        """Queue faults for the next requests of ``key`` ("search", "image:<id>", "file:<id>")."""
        with self._lock:
            self.faults[key].extend(kinds)

    def next_fault(self, key: str) -> str | None:
        with self._lock:
            queue = self.faults.get(key)
            return queue.popleft() if queue else None

    def log(self, kind: str, key: str, status: int) -> None:
        with self._lock:
            self.requests.append((kind, key, status))

    def count(self, kind: str, key: str | None = None, status: int | None = None) -> int:
        """How many requests of ``kind`` (for ``key``, with ``status``) the archive answered."""
        with self._lock:
            return sum(
                k == kind and (key is None or q == key) and (status is None or s == status)
                for k, q, s in self.requests
            )

    def delivered(self, isic_id: str) -> None:
        with self._lock:
            self.deliveries[isic_id] += 1

    # -- content
    def sign(self, isic_id: str, expires: int) -> str:
        sig = hmac.new(SECRET, f"{isic_id}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{self.base}/s3/{isic_id}.jpg?" + urlencode(
            {"X-Amz-Credential": "AKIATESTKEY", "Expires": expires, "Signature": f"SIG{sig}"}
        )

    def record(self, im: ArchiveImage, fresh: bool) -> dict:
        expired = im.isic_id in self.expired_ids and not fresh
        expires = int(time.time()) + (-60 if expired else 3600)
        return {
            "isic_id": im.isic_id,
            "public": True,
            "copyright_license": im.copyright_license,
            "attribution": im.attribution,
            "files": {
                "full": {"url": self.sign(im.isic_id, expires), "size": len(im.data)},
                "thumbnail_256": {"url": self.sign(im.isic_id, expires), "size": len(im.data)},
            },
            "metadata": {"acquisition": dict(im.acquisition), "clinical": dict(im.clinical)},
        }

    def matching(self, params: dict[str, str]) -> list[ArchiveImage]:
        pred = parse_query(params.get("query", ""))
        wanted = {int(c) for c in params.get("collections", "").split(",") if c.strip()}
        return [im for im in self.images if pred(im) and (not wanted or wanted & set(im.collections))]


class _Handler(BaseHTTPRequestHandler):
    archive: FakeIsicArchive

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path
        try:
            if path == "/api/v2/images/search/":
                self._search(params)
            elif path == "/api/v2/images/facets/":
                self._facets(params)
            elif m := re.fullmatch(r"/api/v2/images/([^/]+)/", path):
                self._image(m.group(1))
            elif m := re.fullmatch(r"/s3/([^/]+)\.jpg", path):
                self._file(m.group(1), params)
            else:
                self._json(404, {"detail": "Not Found"}, "other", path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (timeout, kill)

    # -- faults
    def _faulted(self, kind: str, key: str) -> bool:
        fault = self.archive.next_fault(f"{kind}:{key}" if kind != "search" else "search")
        if fault is None:
            return False
        if fault == "429":
            self._json(
                429, {"detail": "Too many requests"}, kind, key, {"Retry-After": self.archive.retry_after}
            )
        elif fault in ("500", "503"):
            self._json(int(fault), {"detail": "server error"}, kind, key)
        elif fault == "slow":
            self.archive.closing.wait(self.archive.slow_seconds)
            self._json(503, {"detail": "too late"}, kind, key)
        elif fault == "hold":
            self.archive.release.wait(60)
            self._json(503, {"detail": "released"}, kind, key)
        else:
            return self._body_fault(fault, kind, key)
        return True

    def _body_fault(self, fault: str, kind: str, key: str) -> bool:
        data = self.archive.by_id[key].data
        half = data[: len(data) // 2]
        self.archive.log(kind, key, 200)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data) if fault == "truncate" else len(half)))
        self.end_headers()
        self.wfile.write(half)
        self.wfile.flush()
        self.close_connection = True
        return True

    # -- endpoints
    def _search(self, params: dict[str, str]) -> None:
        if self._faulted("search", "search"):
            return
        limit = int(params.get("limit", "100") or 100)
        if not 1 <= limit <= 100:
            return self._json(400, {"detail": f"limit {limit} must be 1-100"}, "search", "search")
        try:
            matches = self.archive.matching(params)
        except QueryError as err:
            return self._json(400, {"detail": str(err)}, "search", "search")
        results = [self.archive.record(im, fresh=False) for im in matches] + list(self.archive.extra_records)
        offset = int(base64.urlsafe_b64decode(params["cursor"]).decode()) if params.get("cursor") else 0
        page = results[offset : offset + limit]

        def link(off: int) -> str:
            q = {k: v for k, v in params.items() if k != "cursor"}
            q["cursor"] = base64.urlsafe_b64encode(str(off).encode()).decode()
            return f"{self.archive.api_url}images/search/?{urlencode(q)}"

        body = {
            "count": len(results),
            "next": link(offset + limit) if offset + limit < len(results) else None,
            "previous": link(max(0, offset - limit)) if offset else None,
            "results": page,
        }
        self._json(200, body, "search", "search")

    def _facets(self, params: dict[str, str]) -> None:
        if not self.archive.facets_enabled:
            return self._json(404, {"detail": "Not Found"}, "facets", "facets")
        try:
            matches = self.archive.matching(params)
        except QueryError as err:
            return self._json(400, {"detail": str(err)}, "facets", "facets")
        body = {}
        for key in ("diagnosis_1", "copyright_license", "image_type"):
            counts = Counter(str(im.value(key)) for im in matches)
            body[key] = {
                "meta": {"missing_count": 0, "present_count": len(matches)},
                "buckets": [{"key": k, "doc_count": n} for k, n in sorted(counts.items())],
            }
        self._json(200, body, "facets", "facets")

    def _image(self, isic_id: str) -> None:
        if self._faulted("image", isic_id):
            return
        im = self.archive.by_id.get(isic_id)
        if im is None:
            return self._json(404, {"detail": "Not Found"}, "image", isic_id)
        self._json(200, self.archive.record(im, fresh=True), "image", isic_id)

    def _file(self, isic_id: str, params: dict[str, str]) -> None:
        im = self.archive.by_id.get(isic_id)
        expires = int(params.get("Expires", "0") or 0)
        good = (
            im is not None
            and params.get("Signature") == self.archive.sign(isic_id, expires).rsplit("Signature=", 1)[-1]
        )
        if not good or expires < time.time():
            body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            return self._send(403, body, "application/xml", "file", isic_id)
        if self._faulted("file", isic_id):
            return
        if self.archive.file_latency:
            self.archive.closing.wait(self.archive.file_latency)
        self._send(200, im.data, "image/jpeg", "file", isic_id)
        self.archive.delivered(isic_id)

    # -- plumbing
    def _json(self, status: int, body: dict, kind: str, key: str, headers: dict | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", kind, key, headers)

    def _send(
        self, status: int, data: bytes, ctype: str, kind: str, key: str, headers: dict | None = None
    ) -> None:
        self.archive.log(kind, key, status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
