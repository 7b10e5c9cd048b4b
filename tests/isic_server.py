"""A local ISIC Archive API v2 on 127.0.0.1 for tests, with its storage bucket, another origin, and faults.

It behaves as the archive's own code does (ImageMarkup/isic, read at the time of writing), on three listeners:
the API (:attr:`FakeIsicArchive.api_url`), the storage bucket the records' file URLs point at
(:attr:`FakeIsicArchive.storage`, as ``isic-archive.s3.amazonaws.com`` is for the real API), and another origin
serving the same files (:attr:`FakeIsicArchive.foreign`), so a client's host allow-list can be tested:

* ``GET images/search/?query=&collections=&limit=&cursor=`` (``isic/core/api/image.py``,
  ``isic/core/pagination.py``) -> ``{"count", "next", "previous", "results"}``: results in creation order (not id
  order), ``limit`` as the archive takes it (0 or absent: 100, at most 100, a negative one 0, not a number: 422),
  ``cursor`` standard base64 of ``o=<offset>&r=0&p=<created>`` (one it cannot read: HTTP 422 ``{"detail": [...
  "Invalid cursor."]}``), ``next`` an absolute URL (None on the last page), ``count`` on the first page only (None
  after; :attr:`FakeIsicArchive.count_surplus` makes it overstate what the pages deliver, as the archive's
  Elasticsearch count can); a query it cannot parse is HTTP 400 ``{"message": "Could not parse search query."}``;
  ``collections`` keeps images in the listed collections the caller may see, so unknown or private ids alone
  filter everything out;
* ``GET images/search/size/`` -> ``{"size"}``: the sum of the stated sizes of the matches;
* ``GET images/{isic_id}/`` -> one record, 404 when unknown; ``GET collections/{id}/`` -> the collection, 404
  ``{"detail": "Not Found"}`` when unknown or private (``isic/core/api/collection.py``);
* ``GET images/facets/?query=`` -> ``{field: {"meta": {...}, "buckets": [{"key", "doc_count"}]}}``;
* records ``{"isic_id", "public", "copyright_license", "attribution" (the cohort's default), "files": {"full":
  {"url", "size"}, "thumbnail_256": {...}}, "metadata": {"acquisition": {...}, "clinical": {...}}}``;
* ``files.full.size`` is the size recorded at ingest, but a served JPEG carries the IPTC/XMP credit, licence and
  image id the archive embeds when it publishes (``isic/ingest/services/publish/__init__.py``): APP1 XMP and
  APP13 IPTC after APP0, pixels unchanged, 3149 bytes plus the credit's more (:func:`embed_rights`, the overhead
  measured with the archive's pyexiv2); a PNG is served as stated;
* public images' file URLs are unsigned and permanent, on the storage listener (``/images/<id>.jpg``); a private
  image's URL is signed (``/s3/<id>.jpg?Expires=&Signature=&Key-Pair-Id=``, CloudFront's form) and answers 403
  (AccessDenied XML) once expired.

The query language is that of ``isic/core/dsl.py``: ``field:value``, ``field:"quoted value"``, ``field:*``
(present), ``field:abc*`` / ``field:*abc`` (prefix / suffix), ``field:[a TO b]`` and ``{a TO b}`` ranges on numeric
fields (``*`` for an open end), ``-`` negating one term (which also matches images without the field; there is no
``NOT``), ``AND``, ``OR``, juxtaposed terms (an implicit AND) and parentheses; unknown fields are refused.

Faults are queued per request key (``"search"``, ``"image:<id>"``, ``"file:<id>"``) and used one per request
(:meth:`FakeIsicArchive.fault`), or kept for every request of a key (:meth:`FakeIsicArchive.always`):

* any key: ``"ok"`` (no fault: lets a queued fault wait for a later request), ``"429"`` (with ``Retry-After``), ``"500"``, ``"503"``, ``"slow"`` (answers after the client's
  timeout), ``"hold"`` (waits for :attr:`FakeIsicArchive.release`, then 503), ``"stall"`` (accepts, never
  answers), ``"html"`` (HTTP 200 with an HTML page), ``"redirect-file"`` (302 to ``file:///etc/passwd``),
  ``"redirect-loop"`` (302 to itself), ``"redirect-foreign"`` (302 to the same path on the other origin),
  ``"redirect-self"`` (302 to the same URL once: an accepted hop), ``"redirect-malformed"`` (302 to an
  unparseable URL);
* files: ``"truncate"`` (full ``Content-Length``, a part of the body, then the connection closes), ``"short"``
  (half the stated size with a matching ``Content-Length``: only the stated-size check catches it), ``"drip"``
  (one byte every :attr:`~FakeIsicArchive.drip_interval` seconds), ``"stall-body"`` (headers, then nothing),
  ``"endless"`` (no ``Content-Length``, bytes until the client leaves), ``"huge"`` (``Content-Length: 10**15``,
  then endless), ``"gzip"`` (``Content-Encoding: gzip`` though identity was asked), ``"gzip-bomb"`` (16 MiB of zeros in
  about 16 KB of gzip), ``"swap"`` (another
  image's file), ``"garble"`` (the right length, bytes reversed: does not decode);
* search: ``"deep"`` (JSON nested 200,000 levels), ``"int-next"`` (``next`` an integer), ``"foreign-next"``
  (``next`` on the other origin), ``"bad-cursor-next"`` (``next`` with a cursor the archive refuses: 422).

Persistent faults are data too: a corrupt JPEG is an image whose bytes do not decode (:func:`corrupt`), an
expired URL is a private image's id in :attr:`FakeIsicArchive.expired_ids`, a malicious id is a raw record in
:attr:`FakeIsicArchive.extra_records`, a pixel size the file does not have is a record's ``pixels_x``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import gzip
import hashlib
import hmac
import json
import re
import struct
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
    credit: str = ""  # the per-image credit embedded in the file ("" : the cohort default, ``attribution``)
    created: int = 0  # creation order: the archive lists oldest first
    public: bool = True  # private images have signed, expiring URLs
    embedded_license: str = ""  # the licence embedded in the file ("": ``copyright_license``)

    def value(self, key: str) -> object:
        if key in ("isic_id", "copyright_license", "public"):
            return getattr(self, key)
        return self.acquisition.get(key, self.clinical.get(key))


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _iptc(record: int, dataset: int, value: bytes) -> bytes:
    return struct.pack(">BBBH", 0x1C, record, dataset, len(value)) + value


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


EMBED_OVERHEAD = 3149
"""Bytes the archive's embedding adds to a JPEG besides the credit (measured with its pyexiv2 2.15.5)."""


def embed_rights(data: bytes, credit: str, license_: str, isic_id: str) -> bytes:
    """A JPEG with the archive's published metadata: APP1 XMP (title, supplier id, licence) and APP13 IPTC
    (credit, source, UTF-8 character set) inserted after APP0, the pixels untouched; other data unchanged.

    The XMP padding is sized so the file grows by :data:`EMBED_OVERHEAD` plus the credit's UTF-8 bytes, as the
    archive's does."""
    if data[:2] != b"\xff\xd8":
        return data
    unpadded = _embed(data, credit, license_, isic_id, 0)
    padding = max(0, EMBED_OVERHEAD + len(credit.encode("utf-8")) - (len(unpadded) - len(data)))
    return _embed(data, credit, license_, isic_id, padding)


def _embed(data: bytes, credit: str, license_: str, isic_id: str, padding: int) -> bytes:
    xmp = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/" '
        f'plus:ImageSupplierImageID="{isic_id}" '
        f'xmpRights:WebStatement="https://creativecommons.org/licenses/{_xml(license_.lower())}/">'
        f'<dc:title><rdf:Alt><rdf:li xml:lang="x-default">{isic_id}</rdf:li></rdf:Alt></dc:title>'
        f'<xmpRights:UsageTerms><rdf:Alt><rdf:li xml:lang="x-default">{_xml(license_)}</rdf:li></rdf:Alt>'
        "</xmpRights:UsageTerms>"
        '<plus:Licensor><rdf:Seq><rdf:li plus:LicensorName="ISIC Archive" '
        'plus:LicensorURL="https://www.isic-archive.com"/></rdf:Seq></plus:Licensor>'
        "</rdf:Description></rdf:RDF></x:xmpmeta>" + " " * padding + '<?xpacket end="w"?>'
    )
    app1 = _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp.encode("utf-8"))
    iptc = (
        _iptc(1, 90, b"\x1b%G")
        + _iptc(2, 0, b"\x00\x04")
        + _iptc(2, 110, credit.encode("utf-8"))
        + _iptc(2, 115, b"ISIC Archive")
    )
    iptc += b"\x00" * (len(iptc) % 2)
    app13 = _segment(
        0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(iptc)) + iptc
    )
    at = 2
    if data[2:4] == b"\xff\xe0":  # after APP0 (JFIF)
        at = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:at] + app1 + app13 + data[at:]


def corrupt(data: bytes) -> bytes:
    """A JPEG cut in half: the archive states this size, but the file does not decode."""
    return data[: len(data) // 2]


def phantom_archive(folder: Path, n: int = 24, seed: int = 0, size: int = 32) -> list[ArchiveImage]:
    """``n`` archive images made from phantoms (``size`` px): licences cycle, two are Indeterminate, two clinical.

    One lesion per patient and at most two views of it, so a split has enough groups. Ids are
    ``ISIC_0000001`` ...; even-numbered images are in collection 1 (public), images 1-4 also in collection 2
    (private); image 5 has no lesion id; creation order is a seeded shuffle of the ids; every sixth image
    embeds a credit of its own rather than its cohort's default attribution.
    """
    import random

    from stda_hf.data.phantoms import PhantomConfig, make_phantoms

    make_phantoms(
        folder, PhantomConfig(n=n, size=size, seed=seed, max_lesions_per_patient=1, max_images_per_lesion=2)
    )
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    created = list(range(len(rows)))
    random.Random(seed).shuffle(created)
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
        attribution = f'Clínica {i % 4}, "Dermatology"\nUnit' if i % 4 == 1 else f"Hospital {i % 4}"
        images.append(
            ArchiveImage(
                isic_id=f"ISIC_{i:07d}",
                data=(folder / "images" / f"{row['isic_id']}.jpg").read_bytes(),
                copyright_license=LICENSES[i % 3],
                attribution=attribution,
                credit=f"Dr. Example {i}, Hospital {i % 4}" if i % 6 == 0 else "",
                created=created[i - 1],
                acquisition={
                    "image_type": "clinical: close-up" if i in (7, 20) else "dermoscopic",
                    "pixels_x": size,
                    "pixels_y": size,
                },
                clinical=clinical,
                collections=((1,) if i % 2 == 0 else ()) + ((2,) if i <= 4 else ()),
            )
        )
    return images


# ----------------------------------------------------------------------------------------------------------------
# The query language of isic/core/dsl.py


STR_FIELDS = frozenset(
    {"isic_id", "copyright_license", "diagnosis_1", "diagnosis_2", "diagnosis_3", "image_type", "sex"}
    | {"anatom_site_general"}
)
NUMBER_FIELDS = frozenset({"age_approx"})
BOOL_FIELDS = frozenset({"public", "melanocytic"})
"""The searchable fields these tests use (the reserved ones of dsl.py and some of FIELD_REGISTRY's)."""
PARSE_ERROR = {"message": "Could not parse search query."}

_LEX = re.compile(
    r"\s*(?:(?P<paren>[()])|(?P<op>(?:AND|OR)(?![A-Za-z0-9_*-]))|(?P<term>(?P<neg>-?)(?P<key>[A-Za-z0-9_]+):"
    r'(?P<value>"[^"]*"|[\[{]\s*[^\]}]*[\]}]|[A-Za-z0-9*_.+-]+)))'
)
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"


class QueryError(ValueError):
    pass


def parse_query(query: str):
    """Parse into a predicate over :class:`ArchiveImage` (AND binds tighter than OR; juxtaposed terms AND)."""
    tokens, pos = [], 0
    query = query.strip()
    while pos < len(query):
        m = _LEX.match(query, pos)
        if not m or m.end() == pos:
            raise QueryError(f"cannot parse query at {query[pos : pos + 20]!r}")
        tokens.append(("term", _term(m)) if m.group("term") else ("sym", m.group("paren") or m.group("op")))
        pos = m.end()
    if not tokens:
        return lambda im: True
    pred, rest = _or(tokens)
    if rest:
        raise QueryError(f"unexpected {rest[0][1]!r}")
    return pred


def _or(tokens):
    left, tokens = _and(tokens)
    while tokens and tokens[0] == ("sym", "OR"):
        right, tokens = _and(tokens[1:])
        left = (lambda a, b: lambda im: a(im) or b(im))(left, right)
    return left, tokens


def _and(tokens):
    left, tokens = _unit(tokens)
    while tokens and tokens[0] == ("sym", "AND"):
        right, tokens = _unit(tokens[1:])
        left = (lambda a, b: lambda im: a(im) and b(im))(left, right)
    return left, tokens


def _unit(tokens):
    """A parenthesised expression, or one or more juxtaposed terms (dsl.py's ``OneOrMore`` operand)."""
    if not tokens:
        raise QueryError("query ends early")
    if tokens[0] == ("sym", "("):
        inner, rest = _or(tokens[1:])
        if not rest or rest[0] != ("sym", ")"):
            raise QueryError("missing )")
        return inner, rest[1:]
    terms = []
    while tokens and tokens[0][0] == "term":
        terms.append(tokens[0][1])
        tokens = tokens[1:]
    if not terms:
        raise QueryError(f"unexpected {tokens[0][1]!r}")
    return (lambda ts: lambda im: all(t(im) for t in ts))(terms), tokens


def _term(m: re.Match):
    key, raw, negated = m.group("key"), m.group("value"), bool(m.group("neg"))
    if key in STR_FIELDS:
        match = _str_match(raw)
    elif key in NUMBER_FIELDS:
        match = _number_match(raw)
    elif key in BOOL_FIELDS:
        if raw not in ("true", "false", "*"):
            raise QueryError(f"{key} takes true, false or *")
        match = (lambda v: True) if raw == "*" else (lambda v, want=raw == "true": v is want)
    else:
        raise QueryError(f"unknown field {key!r}")

    def pred(im: ArchiveImage) -> bool:
        v = im.value(key)
        hit = v is not None and match(v)
        return hit != negated  # a negated term also matches images without the field

    return pred


def _str_match(raw: str):
    if raw.startswith('"'):
        value = raw[1:-1]
        return lambda v: str(v) == value
    if not re.fullmatch(r"[A-Za-z0-9*_-]+", raw):
        raise QueryError(f"bad value {raw!r}")
    if raw == "*":
        return lambda v: True
    if raw.startswith("*"):
        return lambda v: str(v).endswith(raw[1:])
    if raw.endswith("*"):
        return lambda v: str(v).startswith(raw[:-1])
    return lambda v: str(v) == raw


def _number_match(raw: str):
    if raw == "*":
        return lambda v: True
    if re.fullmatch(_NUMBER, raw):
        return lambda v: float(v) == float(raw)
    m = re.fullmatch(rf"([\[{{])\s*({_NUMBER}|\*)\s+TO\s+({_NUMBER}|\*)\s*([\]}}])", raw)
    if not m:
        raise QueryError(f"bad number or range {raw!r}")
    low, high = m.group(2), m.group(3)

    def match(v) -> bool:
        x = float(v)
        above = low == "*" or (x >= float(low) if m.group(1) == "[" else x > float(low))
        below = high == "*" or (x <= float(high) if m.group(4) == "]" else x < float(high))
        return above and below

    return match


# ----------------------------------------------------------------------------------------------------------------
# The server


DEEP_JSON = b"[" * 200_000 + b"]" * 200_000
"""An API answer nested 200,000 levels deep (Python's json raises RecursionError on it)."""


@functools.cache
def gzip_bomb() -> bytes:
    """16 MiB of zeros in about 16 KB of gzip (made on first use)."""
    return gzip.compress(b"\0" * (16 << 20), compresslevel=9)


ROLES = ("api", "storage", "foreign")


@dataclass
class FakeIsicArchive:
    """The archive's state, its faults and what it saw; :meth:`start` serves it on three 127.0.0.1 listeners."""

    images: list[ArchiveImage]
    extra_records: list[dict] = field(default_factory=list)  # raw records appended to every search
    expired_ids: set[str] = field(default_factory=set)  # private images whose search URL is already expired
    collections: dict[int, bool] = field(default_factory=lambda: {1: True, 2: False})  # id -> public
    embed_metadata: bool = True  # serve JPEGs with the IPTC/XMP the archive embeds (larger than stated)
    size_endpoint: bool = True
    facets_enabled: bool = True
    count_surplus: int = 0  # the first page's count exceeds the records the pages deliver by this many
    retry_after: str = "2"
    slow_seconds: float = 3.0
    drip_interval: float = 0.2  # seconds between the bytes of a "drip" answer
    file_latency: float = 0.0  # seconds before each file answer (a network round trip, for benchmarks)
    faults: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    persistent: dict[str, str] = field(default_factory=dict)  # key -> fault answered to every request
    deliveries: Counter = field(default_factory=Counter)  # complete file bodies sent, per id
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, key, status)
    hosts: Counter = field(default_factory=Counter)  # role -> requests it received
    encodings: Counter = field(default_factory=Counter)  # Accept-Encoding header -> requests that sent it
    release: threading.Event = field(default_factory=threading.Event)
    closing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self.by_id = {im.isic_id: im for im in self.images}

    # -- lifecycle
    def start(self) -> FakeIsicArchive:
        archive = self
        for role in ROLES:

            class Handler(_Handler):
                pass

            Handler.archive, Handler.role = archive, role
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
            self._servers[role] = server
        return self

    def stop(self) -> None:
        self.closing.set()
        self.release.set()
        for server in self._servers.values():
            server.shutdown()
            server.server_close()

    def origin(self, role: str) -> str:
        return f"http://127.0.0.1:{self._servers[role].server_address[1]}"

    @property
    def base(self) -> str:
        return self.origin("api")

    @property
    def storage(self) -> str:
        """The storage bucket's origin: where the records' file URLs point."""
        return self.origin("storage")

    @property
    def foreign(self) -> str:
        """Another origin serving the same files (no client should accept it)."""
        return self.origin("foreign")

    @property
    def api_url(self) -> str:
        return f"{self.base}/api/v2/"

    # -- faults and bookkeeping
    def fault(self, key: str, *kinds: str) -> None:
        """Queue faults for the next requests of ``key`` ("search", "image:<id>", "file:<id>")."""
        with self._lock:
            self.faults[key].extend(kinds)

    def always(self, key: str, kind: str) -> None:
        """Answer every request of ``key`` with the fault ``kind`` (after the queued ones)."""
        with self._lock:
            self.persistent[key] = kind

    def next_fault(self, key: str) -> str | None:
        with self._lock:
            queue = self.faults.get(key)
            return queue.popleft() if queue else self.persistent.get(key)

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

    def saw(self, role: str, accept_encoding: str) -> None:
        with self._lock:
            self.hosts[role] += 1
            self.encodings[accept_encoding] += 1

    # -- content
    @staticmethod
    def extension(im: ArchiveImage) -> str:
        return "png" if im.data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"

    def sign(self, isic_id: str, expires: int, ext: str = "jpg") -> str:
        sig = hmac.new(SECRET, f"{isic_id}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{self.storage}/s3/{isic_id}.{ext}?" + urlencode(
            {"Expires": expires, "Signature": f"SIG{sig}", "Key-Pair-Id": "AKIATESTKEY"}
        )

    def url(self, im: ArchiveImage, fresh: bool) -> str:
        """A public image's permanent unsigned URL, or a private one's signed URL (expired if listed so)."""
        if im.public:
            return f"{self.storage}/images/{im.isic_id}.{self.extension(im)}"
        expired = im.isic_id in self.expired_ids and not fresh
        return self.sign(im.isic_id, int(time.time()) + (-60 if expired else 3600), self.extension(im))

    def served(self, im: ArchiveImage) -> bytes:
        """The bytes the file server sends: with the published metadata embedded (JPEGs only)."""
        if not self.embed_metadata:
            return im.data
        return embed_rights(
            im.data, im.credit or im.attribution, im.embedded_license or im.copyright_license, im.isic_id
        )

    def record(self, im: ArchiveImage, fresh: bool) -> dict:
        """The API's record: ``files.full.size`` is the size recorded at ingest, before the embedding."""
        return {
            "isic_id": im.isic_id,
            "public": im.public,
            "copyright_license": im.copyright_license,
            "attribution": im.attribution,
            "files": {
                "full": {"url": self.url(im, fresh), "size": len(im.data)},
                "thumbnail_256": {
                    "url": f"{self.storage}/thumbnails/{im.isic_id}_thumbnail.jpg",
                    "size": len(im.data),
                },
            },
            "metadata": {"acquisition": dict(im.acquisition), "clinical": dict(im.clinical)},
        }

    def matching(self, params: dict[str, str]) -> list[ArchiveImage]:
        """Matches in creation order; ``collections`` keeps images in the listed collections that are visible
        (public), so a list of only unknown or private ids matches nothing."""
        pred = parse_query(params.get("query", ""))
        wanted = {int(c) for c in params.get("collections", "").split(",") if c.strip()}
        visible = {c for c in wanted if self.collections.get(c)}
        found = [im for im in self.images if pred(im) and (not wanted or visible & set(im.collections))]
        return sorted(found, key=lambda im: im.created)


def encode_cursor(offset: int, created: int) -> str:
    """The archive's cursor: standard base64 of ``o=<offset>&r=0&p=<created>`` (``isic/core/pagination.py``)."""
    return base64.b64encode(urlencode({"o": offset, "r": 0, "p": created}).encode()).decode()


def decode_cursor(cursor: str) -> int:
    """The offset of a cursor; ValueError for one the archive would refuse."""
    try:
        fields = parse_qs(base64.b64decode(cursor, validate=True).decode("ascii"), strict_parsing=True)
        return int(fields["o"][0])
    except (binascii.Error, UnicodeDecodeError, KeyError, ValueError) as err:
        raise ValueError("Invalid cursor.") from err


def _limit(raw: str | None) -> int:
    """``limit`` as the archive clamps it: 0 or absent -> 100, at most 100, a negative one -> 0."""
    value = int(raw) if raw not in (None, "") else 0
    return max(0, min(value or 100, 100))


class _Handler(BaseHTTPRequestHandler):
    archive: FakeIsicArchive
    role: str

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.archive.saw(self.role, self.headers.get("Accept-Encoding", ""))
        parts = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path
        try:
            if self.role == "api":
                self._api(path, params)
            elif m := re.fullmatch(r"/s3/([^/]+)\.(jpg|png)", path):
                self._file(m.group(1), params)
            elif m := re.fullmatch(r"/images/([^/]+)\.(jpg|png)", path):
                self._file(m.group(1), None)
            else:
                self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml", "other", path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (timeout, kill, a refused body)

    def _api(self, path: str, params: dict[str, str]) -> None:
        if path == "/api/v2/images/search/":
            self._search(params)
        elif path == "/api/v2/images/search/size/":
            self._size(params)
        elif m := re.fullmatch(r"/api/v2/collections/([^/]+)/", path):
            self._collection(m.group(1))
        elif path == "/api/v2/images/facets/":
            self._facets(params)
        elif m := re.fullmatch(r"/api/v2/images/([^/]+)/", path):
            self._image(m.group(1))
        else:
            self._json(404, {"detail": "Not Found"}, "other", path)

    # -- faults
    def _faulted(self, kind: str, key: str) -> bool:
        fault = self.archive.next_fault(f"{kind}:{key}" if kind != "search" else "search")
        if fault in (None, "ok"):  # "ok": answer this request normally (a fault queued after it waits)
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
        elif fault == "stall":
            self.archive.log(kind, key, 0)
            self.archive.closing.wait(600)
        elif fault == "html":
            self._send(200, b"<html><body>Down for maintenance</body></html>", "text/html", kind, key)
        elif fault.startswith("redirect-"):
            self._redirect(fault, kind, key)
        elif kind == "search":
            return self._search_fault(fault)
        else:
            return self._body_fault(fault, kind, key)
        return True

    def _redirect(self, fault: str, kind: str, key: str) -> None:
        here = f"{self.archive.origin(self.role)}{self.path}"
        target = {
            "redirect-file": "file:///etc/passwd",
            "redirect-loop": here,
            "redirect-self": here,
            "redirect-foreign": f"{self.archive.foreign}{self.path}",
            "redirect-malformed": "http://[::1/images/x.jpg",
        }[fault]
        if fault == "redirect-loop":
            self.archive.fault(f"{kind}:{key}" if kind != "search" else "search", "redirect-loop")
        self._send(302, b"", "text/plain", kind, key, {"Location": target})

    def _search_fault(self, fault: str) -> bool:
        if fault == "deep":
            self._send(200, DEEP_JSON, "application/json", "search", "search")
            return True
        page = {"count": 1, "previous": None, "results": []}
        page["next"] = {
            "int-next": 12345,
            "foreign-next": f"{self.archive.foreign}/api/v2/images/search/?cursor=x",
            "bad-cursor-next": f"{self.archive.api_url}images/search/?cursor=%25%25%25",
        }[fault]
        self._json(200, page, "search", "search")
        return True

    def _body_fault(self, fault: str, kind: str, key: str) -> bool:
        im = self.archive.by_id[key]
        data = self.archive.served(im)
        self.archive.log(kind, key, 200)
        if fault == "swap":
            other = next(o for o in self.archive.images if o.isic_id != key and o.data[:2] == im.data[:2])
            return self._raw(self.archive.served(other))
        if fault == "garble":
            return self._raw(data[::-1])
        if fault == "gzip":
            return self._raw(gzip.compress(data), {"Content-Encoding": "gzip"})
        if fault == "gzip-bomb":
            return self._raw(gzip_bomb(), {"Content-Encoding": "gzip"})
        if fault in ("truncate", "short"):
            half = data[: len(im.data) // 2]  # fewer bytes than even the stated (pre-embedding) size
            self._head({"Content-Length": str(len(data) if fault == "truncate" else len(half))})
            self.wfile.write(half)
        elif fault == "drip":
            self._head({"Content-Length": str(len(data))})
            for i in range(len(data)):
                if self.archive.closing.wait(self.archive.drip_interval):
                    break
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
        elif fault == "stall-body":
            self._head({"Content-Length": str(len(data))})
            self.wfile.flush()
            self.archive.closing.wait(600)
        elif fault in ("endless", "huge"):
            self._head({"Content-Length": str(10**15)} if fault == "huge" else {"Connection": "close"})
            self.wfile.write(data)
            while not self.archive.closing.is_set():
                self.wfile.write(b"\0" * 65536)
        else:
            raise ValueError(f"unknown fault {fault!r}")
        self.wfile.flush()
        self.close_connection = True
        return True

    def _head(self, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _raw(self, body: bytes, headers: dict[str, str] | None = None) -> bool:
        self._head({"Content-Length": str(len(body)), **(headers or {})})
        self.wfile.write(body)
        self.wfile.flush()
        return True

    # -- endpoints
    def _search(self, params: dict[str, str]) -> None:
        if self._faulted("search", "search"):
            return
        try:
            limit = _limit(params.get("limit"))
            offset = decode_cursor(params["cursor"]) if params.get("cursor") else 0
        except ValueError:
            loc = "cursor" if params.get("cursor") else "limit"
            detail = [{"type": "value_error", "loc": ["query", loc], "msg": "Value error, Invalid cursor."}]
            return self._json(422, {"detail": detail}, "search", "search")
        try:
            matches = self.archive.matching(params)
        except QueryError:
            return self._json(400, PARSE_ERROR, "search", "search")
        results = [self.archive.record(im, fresh=False) for im in matches] + list(self.archive.extra_records)
        page = results[offset : offset + limit]

        def link(off: int) -> str:
            q = {k: v for k, v in params.items() if k != "cursor"}
            q["cursor"] = encode_cursor(off, off)
            return f"{self.archive.api_url}images/search/?{urlencode(sorted(q.items()))}"

        body = {
            "count": None if offset else len(results) + self.archive.count_surplus,  # on the first page only
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
        except QueryError:
            return self._json(400, PARSE_ERROR, "facets", "facets")
        body = {}
        for key in ("diagnosis_1", "copyright_license", "image_type"):
            counts = Counter(str(im.value(key)) for im in matches)
            body[key] = {
                "meta": {"missing_count": 0, "present_count": len(matches)},
                "buckets": [{"key": k, "doc_count": n} for k, n in sorted(counts.items())],
            }
        self._json(200, body, "facets", "facets")

    def _size(self, params: dict[str, str]) -> None:
        if not self.archive.size_endpoint:
            return self._json(404, {"detail": "Not Found"}, "size", "size")
        try:
            matches = self.archive.matching(params)
        except QueryError:
            return self._json(400, PARSE_ERROR, "size", "size")
        self._json(200, {"size": sum(len(im.data) for im in matches)}, "size", "size")

    def _collection(self, raw_id: str) -> None:
        public = self.archive.collections.get(int(raw_id)) if raw_id.isdigit() else None
        if not public:
            return self._json(404, {"detail": "Not Found"}, "collection", raw_id)
        body = {"id": int(raw_id), "name": f"Collection {raw_id}", "description": "", "public": True}
        self._json(
            200,
            {**body, "pinned": False, "locked": False, "doi": None, "doi_url": None},
            "collection",
            raw_id,
        )

    def _image(self, isic_id: str) -> None:
        if self._faulted("image", isic_id):
            return
        im = self.archive.by_id.get(isic_id)
        if im is None:
            return self._json(404, {"detail": "Not Found"}, "image", isic_id)
        self._json(200, self.archive.record(im, fresh=True), "image", isic_id)

    def _file(self, isic_id: str, params: dict[str, str] | None) -> None:
        """``params`` None: the unsigned URL of a public image; else a signed URL's query."""
        im = self.archive.by_id.get(isic_id)
        if params is None:
            good = im is not None and im.public
        else:
            expires = int(params.get("Expires", "0") or 0)
            signature = self.archive.sign(isic_id, expires).split("Signature=", 1)[-1].split("&", 1)[0]
            good = im is not None and params.get("Signature") == signature and expires >= time.time()
        if not good:
            body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            return self._send(403, body, "application/xml", "file", isic_id)
        if self._faulted("file", isic_id):
            return
        if self.archive.file_latency:
            self.archive.closing.wait(self.archive.file_latency)
        ctype = "image/png" if self.archive.extension(im) == "png" else "image/jpeg"
        self._send(200, self.archive.served(im), ctype, "file", isic_id)
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
