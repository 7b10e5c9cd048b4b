"""A retrying, redacting HTTP client: timeouts, backoff with jitter, ``Retry-After``, one session per thread.

What the network stages share (``stda fetch`` today): 429 and 5xx answers, timeouts and broken transfers are
retried with exponential backoff and equal jitter, honouring ``Retry-After``; query strings (where signed URLs
keep their credentials) are removed from every message and from urllib3's debug log; an interrupt ends every
wait at once. What a service's answers mean stays with its stage.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import requests

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


class Retry(Exception):
    """A transient failure (429, 5xx, timeout, broken transfer): wait and try again."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class GaveUp(Exception):
    """Every try failed transiently."""


class Stopped(Exception):
    """The run is being interrupted; workers give up at once."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for an answer and how to retry."""

    timeout: float = 60.0  # seconds to wait for a connection or for the next bytes of an answer
    retries: int = 6  # further tries after a transient failure
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
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped()

    def retrying(self, what: str, attempt: Callable[[], object]):
        """Call ``attempt()`` until it returns, retrying each :class:`Retry` it raises.

        Raises
        ------
        GaveUp
            Every try failed transiently (the message has the last reason).
        Stopped
            :attr:`stop` was set.
        """
        last = ""
        p = self.policy
        for n in range(p.retries + 1):
            if self.stop.is_set():
                raise Stopped()
            try:
                return attempt()
            except Retry as err:
                last = err.reason
                if n == p.retries:
                    break
                if err.retry_after is not None:
                    delay = min(err.retry_after, p.max_backoff)
                else:
                    delay = backoff_delay(n, p.backoff, p.max_backoff, self._rng)
                logger.debug("%s: %s; try %d of %d in %.2fs", what, last, n + 2, p.retries + 1, delay)
                self._sleep(delay)
        raise GaveUp(f"{last} (gave up after {p.retries + 1} tries)")

    def get(self, url: str, **kwargs) -> requests.Response:
        """One GET with the policy's timeout; a transport failure becomes a redacted :class:`Retry`."""
        try:
            return self.session().get(url, timeout=self.policy.timeout, **kwargs)
        except TRANSIENT_ERRORS as err:
            raise Retry(redact(err)) from err
