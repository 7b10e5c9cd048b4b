"""A retrying, redacting, bounded HTTP client: timeouts, deadlines, size caps, checked redirects, backoff.

What the network stages share (``stda fetch`` today): 429 and 5xx answers, timeouts and broken transfers are
retried with exponential backoff and equal jitter, honouring ``Retry-After``; query strings (where signed URLs
keep their credentials) are removed from every message and from urllib3's debug log; an interrupt ends every
wait at once. Every body is read raw in small pieces (:func:`read_body`), so a try ends at its deadline, past
its size cap, or within one read timeout of an interrupt, whatever the server does; ``identity`` encoding is
asked for, and a gzip or deflate body is inflated here under the same cap. Redirects are followed by hand
(:meth:`RetryingClient.get`): http(s) only, never from https to http, at most :data:`MAX_REDIRECTS`, each hop
checked by the caller. What a service's answers mean stays with its stage.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

logger = logging.getLogger(__name__)

_QUERY_SECRET = re.compile(r"\?[^\s'\"<>)]*")
_HEADER_SECRET = re.compile(
    r"(?i)(['\"]?(?:authorization|proxy-authorization|cookie|set-cookie|x-amz-security-token|x-amz-signature"
    r"|x-api-key|x-auth-token|location)['\"]?\s*[:=]\s*)(['\"]?)[^'\"\r\n,}]*"
)
_BEARER = re.compile(r"(?i)\b(bearer|token|basic)\s+[A-Za-z0-9._~+/=-]{8,}")

TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
"""What ``requests`` raises for a failure worth another try."""
RAW_ERRORS = (urllib3.exceptions.HTTPError, OSError)
"""What reading a body raw (urllib3, the socket) raises for a broken transfer: worth another try."""
READ_BYTES = 64 << 10
"""Bytes asked of the socket per read: the deadline, the cap and an interrupt are checked between reads."""
MAX_REDIRECTS = 5
"""Redirect hops one request may take (S3 and CloudFront need none; requests allowed 30)."""
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
ENCODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
"""``Content-Encoding`` values inflated here (under the size cap): what a proxy may add though identity was asked."""


class Retry(Exception):
    """A transient failure (429, 5xx, timeout, broken transfer, bad content): wait and try again.

    ``kind`` says what failed, in a word a summary can count by (``transfer``, ``content``).
    """

    def __init__(self, reason: str, retry_after: float | None = None, kind: str = "transfer"):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.kind = kind


class GaveUp(Exception):
    """Every try failed transiently; ``kind`` is the last failure's."""

    def __init__(self, reason: str, kind: str = "transfer"):
        super().__init__(reason)
        self.kind = kind


class Refused(Exception):
    """A request that must not be made or followed (a redirect off the accepted hosts, to ``file://``, a loop, a
    body in an encoding we do not read, any other protocol error): not retried. ``kind`` as for :class:`Retry`."""

    def __init__(self, reason: str, kind: str = "protocol"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class TooLarge(Refused):
    """A body longer than its cap (announced or read): not retried."""

    def __init__(self, reason: str):
        super().__init__(reason, kind="too large")


class Stopped(Exception):
    """The run is being interrupted; workers give up at once."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for an answer and how to retry."""

    timeout: float = 60.0  # seconds to wait for a connection or for the next bytes of an answer
    retries: int = 6  # further tries after a transient failure
    deadline: float = 300.0  # seconds one try (one page, one file) may take in all, however the bytes trickle
    backoff: float = 1.0  # seconds before the first retry; doubles each try, with jitter
    max_backoff: float = 120.0  # longest wait between two tries, Retry-After included


def redact(text: object) -> str:
    """``text`` with every URL query string (where signed URLs keep their credentials) removed, and the values
    of credential-bearing HTTP headers (``Authorization``, ``Cookie``, ``Set-Cookie``, ``Location``, S3 tokens,
    in ``Name: value`` or ``{'Name': 'value'}`` form) and bearer tokens replaced by ``<redacted>``."""
    text = _HEADER_SECRET.sub(r"\1\2<redacted>", str(text))
    text = _BEARER.sub(r"\1 <redacted>", text)
    return _QUERY_SECRET.sub("?<redacted>", text)


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


def transient_status(r: requests.Response) -> Retry | None:
    """A :class:`Retry` for a 429 or 5xx answer (with its ``Retry-After``), else None."""
    if r.status_code == 429 or r.status_code >= 500:
        return Retry(f"HTTP {r.status_code}", retry_after_seconds(r.headers.get("Retry-After")))
    return None


def excerpt(r: requests.Response) -> str:
    """The start of an answer's body on one line, redacted (for error messages)."""
    text = " ".join(r.text[:300].split())
    return redact(text) or "(empty answer)"


class _RedactQueries(logging.Filter):
    """Strip query strings and header secrets from a logger's messages (urllib3 logs full request URLs, and
    its header-parsing warnings the headers, at DEBUG level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


HTTP_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "urllib3.response", "urllib3.util.retry")
"""The loggers that write request URLs or response headers (a filter on a logger does not reach its children)."""


def redact_http_debug_logs() -> None:
    """Install the redacting filter on every urllib3 logger that writes URLs or headers (once each)."""
    for name in HTTP_LOGGERS:
        http_logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactQueries) for f in http_logger.filters):
            http_logger.addFilter(_RedactQueries())


class RetryingClient:
    """HTTP with retries and timeouts over one ``requests.Session`` per thread.

    Parameters
    ----------
    policy : RetryPolicy
        Timeout and retry settings.
    sleep : callable, optional
        ``sleep(seconds)`` between tries; the default waits on :attr:`stop`, so an interrupt ends it.
    user_agent : str
        The ``User-Agent`` header of every request.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        sleep: Callable[[float], None] | None = None,
        user_agent: str = "stda-hf",
    ):
        self.policy = policy
        self.stop = threading.Event()
        self._sleep = sleep or self._wait
        self._rng = random.Random()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._user_agent = user_agent
        redact_http_debug_logs()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's session."""
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def session(self) -> requests.Session:
        """This thread's session (made on first use)."""
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = self._user_agent
            s.headers["Accept-Encoding"] = "identity"  # sizes are then the bytes on the wire
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped()

    def retrying(self, what: str, attempt: Callable[[], object], level: int = logging.DEBUG):
        """Call ``attempt()`` until it returns, retrying each :class:`Retry` it raises (each logged at ``level``).

        Raises
        ------
        GaveUp
            Every try failed transiently (the message has the last reason).
        Stopped
            :attr:`stop` was set.
        """
        last, kind = "", "transfer"
        p = self.policy
        for n in range(p.retries + 1):
            if self.stop.is_set():
                raise Stopped()
            try:
                return attempt()
            except Retry as err:
                last, kind = err.reason, err.kind
                if n == p.retries:
                    break
                if err.retry_after is not None:
                    delay = min(err.retry_after, p.max_backoff)
                else:
                    delay = backoff_delay(n, p.backoff, p.max_backoff, self._rng)
                logger.log(level, "%s: %s; try %d of %d in %.2fs", what, last, n + 2, p.retries + 1, delay)
                self._sleep(delay)
        raise GaveUp(f"{last} (gave up after {p.retries + 1} tries)", kind)

    def get(
        self, url: str, accept: Callable[[str], str | None] | None = None, params: dict | None = None
    ) -> requests.Response:
        """One streamed GET with the policy's timeout, following redirects by hand.

        Each hop must be http(s), must not go from https to http, and must pass ``accept(url)`` (which returns
        None, or why the URL is refused); at most :data:`MAX_REDIRECTS` hops. The answer's body is not read:
        read it with :meth:`read_body`, and close it (``with``).

        Raises
        ------
        Retry
            A transport failure (redacted).
        Refused
            A hop that is refused, too many hops, or any other request error.
        """
        for hop in range(MAX_REDIRECTS + 1):
            problem = check_url(url) or (accept(url) if accept else None)
            if problem:
                raise Refused(f"a redirect to {problem}" if hop else problem, kind="host")
            try:
                r = self.session().get(
                    url, params=params, timeout=self.policy.timeout, stream=True, allow_redirects=False
                )
            except TRANSIENT_ERRORS as err:
                raise Retry(redact(err)) from err
            except (requests.RequestException, ValueError) as err:
                raise Refused(f"the request failed: {redact(err)}") from err
            if r.status_code not in REDIRECT_STATUS:
                return r
            location = r.headers.get("Location", "")
            r.close()
            try:
                nxt = urljoin(r.url, location)
            except ValueError:
                raise Refused(
                    f"a redirect to a malformed URL {redact(location)[:120]!r}", kind="host"
                ) from None
            if urlsplit(r.url).scheme == "https" and urlsplit(nxt).scheme == "http":
                raise Refused(f"a redirect from https to plain http ({redact(nxt)})", kind="host")
            url, params = nxt, None
        raise Refused(f"more than {MAX_REDIRECTS} redirects (a loop?) from {redact(url)}")

    def read_body(self, r: requests.Response, write: Callable[[bytes], object], cap: int) -> int:
        """Stream ``r``'s body to ``write`` in small raw reads; return the bytes written (inflated if encoded).

        The try ends at the policy's deadline (counted from :meth:`get`'s answer), past ``cap`` bytes (announced
        or read, before or after inflating), or at the next read after :attr:`stop` is set.

        Raises
        ------
        Retry
            The deadline passed, the transfer broke, or fewer bytes came than ``Content-Length`` announced.
        TooLarge
            More than ``cap`` bytes.
        Refused
            An encoding other than identity, gzip or deflate.
        Stopped
            :attr:`stop` was set.
        """
        return read_body(r, write, cap, self.policy.deadline, self.stop)


def check_url(url: object) -> str | None:
    """Why ``url`` may not be requested (not a string, not http(s), no host), or None."""
    if not isinstance(url, str):
        return f"a URL that is a {type(url).__name__}, not text"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        return f"{redact(url)[:120]!r} is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{redact(url)[:120]!r} is not an http(s) URL"
    return None


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, lower-cased: what a host allow-list compares."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def read_body(
    r: requests.Response, write: Callable[[bytes], object], cap: int, deadline: float, stop: threading.Event
) -> int:
    """:meth:`RetryingClient.read_body` for one answer; ``deadline`` in seconds from now."""
    end = time.monotonic() + deadline
    length = r.headers.get("Content-Length", "")
    announced = int(length) if length.strip().isdigit() else None
    if announced is not None and announced > cap:
        raise TooLarge(f"the server announces {announced} bytes, more than the cap of {cap}")
    encoding = r.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    inflate = None
    if encoding != "identity":
        if encoding not in ENCODINGS:
            raise Refused(
                f"the server sent Content-Encoding {encoding!r}; only identity, gzip and deflate are read"
            )
        inflate = zlib.decompressobj(ENCODINGS[encoding])
    raw = written = 0
    while True:
        if stop.is_set():
            raise Stopped()
        if time.monotonic() > end:
            raise Retry(f"the transfer took longer than the {deadline:g} s deadline ({raw} bytes so far)")
        data = _read_raw(r)
        if not data:
            break
        raw += len(data)
        chunk = data if inflate is None else _inflate(inflate, data, cap - written + 1, encoding)
        written += len(chunk)
        if raw > cap or written > cap:
            raise TooLarge(f"the body goes on past the cap of {cap} bytes")
        write(chunk)  # an OSError here is the disk's (full, read-only): not a transfer to retry
    if inflate is not None:
        tail = _inflate(inflate, b"", cap - written + 1, encoding) + inflate.flush()
        written += len(tail)
        if written > cap:
            raise TooLarge(f"the body inflates past the cap of {cap} bytes")
        write(tail)
    if announced is not None and raw != announced:
        raise Retry(f"got {raw} of the {announced} bytes the server announced")
    return written


def _read_raw(r: requests.Response) -> bytes:
    """At most :data:`READ_BYTES` of the raw body, as soon as any arrive (b"" at its end)."""
    try:
        return r.raw.read1(READ_BYTES, decode_content=False)
    except RAW_ERRORS as err:
        raise Retry(f"the transfer broke: {redact(err)}") from err


def _inflate(inflate, data: bytes, max_length: int, encoding: str) -> bytes:
    """``data`` inflated, at most ``max_length`` bytes of it (the rest stays in the decompressor)."""
    try:
        return inflate.decompress(inflate.unconsumed_tail + data, max_length)
    except zlib.error as err:
        raise Retry(f"the {encoding} body does not inflate: {err}") from err
