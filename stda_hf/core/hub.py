"""Uploading a folder to the Hugging Face Hub: create the repo, upload, retry what is transient, keep the token secret.

``stda push`` (a dataset repo) and ``train.py --push-to-hub`` (a model repo) both upload through
:func:`upload_folder`. The token comes from the caller, ``HF_TOKEN`` or the saved ``hf auth login``; it is
passed to ``huggingface_hub`` and never printed, logged or written: every error message is scrubbed of it
(:func:`scrub`). Transient failures (HTTP 429/5xx, a dropped connection) are retried with exponential backoff;
LFS objects the Hub already holds are not sent again, so a retry only sends what is missing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from stda_hf.core.errors import StdaError

logger = logging.getLogger(__name__)

TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
"""Anything shaped like a Hub token; scrubbed from every message."""

T = TypeVar("T")


@dataclass
class Upload:
    """Where and how a folder goes to the Hub."""

    repo_id: str  # <owner>/<name>
    repo_type: str = "dataset"  # dataset | model
    private: bool = False  # create the repo private (an existing repo keeps its visibility)
    revision: str = ""  # branch to upload to; created from main when missing ("" = main)
    commit_message: str = "Upload with stda-hf"  # message of the upload commit
    retries: int = 3  # attempts for transient failures (HTTP 429/5xx, dropped connections)
    retry_wait: float = 2.0  # seconds before the first retry, doubled after each
    delete_patterns: Sequence[str] = field(default_factory=list)  # remote files the upload replaces


def hub_token() -> str:
    """The Hub token of ``HF_TOKEN`` or the saved login.

    Raises
    ------
    StdaError
        When there is none, saying how to log in.
    """
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise StdaError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)"
        )
    return token


def upload_folder(folder: str | Path, upload: Upload, token: str | None = None) -> str:
    """Create ``upload.repo_id`` if needed and upload ``folder`` (hidden files excluded); return the commit URL.

    Raises
    ------
    StdaError
        No token, a refused token or repo, or failures that outlast the retries; never holding the token.
    """
    token = token or hub_token()
    try:
        return with_retries(lambda: _upload(Path(folder), upload, token), upload)
    except StdaError as err:
        raise StdaError(scrub(str(err), token)) from None


def _upload(folder: Path, upload: Upload, token: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    kind = upload.repo_type
    api.create_repo(upload.repo_id, repo_type=kind, private=upload.private, exist_ok=True)
    if upload.revision:
        api.create_branch(upload.repo_id, branch=upload.revision, repo_type=kind, exist_ok=True)
    info = api.upload_folder(
        repo_id=upload.repo_id,
        repo_type=kind,
        folder_path=folder,
        revision=upload.revision or None,
        commit_message=upload.commit_message,
        ignore_patterns=[".*", "**/.*"],
        delete_patterns=list(upload.delete_patterns) or None,
    )
    return info.commit_url


def with_retries(call: Callable[[], T], upload: Upload) -> T:
    """Run ``call``; retry transient failures with exponential backoff; turn the rest into StdaError."""
    wait = upload.retry_wait
    for attempt in range(1, upload.retries + 1):
        try:
            return call()
        except Exception as err:
            transient = _is_transient(err)
            if not transient or attempt == upload.retries:
                raise StdaError(_describe(err, upload.repo_id, attempt, transient)) from None
            logger.warning(
                "push attempt %d/%d failed (%s); retrying in %.1fs",
                attempt,
                upload.retries,
                _short(err),
                wait,
            )
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(err: Exception) -> bool:
    status = _status(err)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(err, (ConnectionError, TimeoutError)) or type(err).__module__.startswith(
        ("httpx", "httpcore")
    )


def _short(err: Exception) -> str:
    status = _status(err)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"HTTP {status}: {first}" if status else first


def _describe(err: Exception, repo_id: str, attempt: int, transient: bool) -> str:
    status = _status(err)
    if status in (401, 403):
        return (
            f"push to {repo_id} failed (HTTP {status}): the Hub refused the token; log in with `hf auth login` "
            "or set HF_TOKEN to a token with write access to that namespace"
        )
    if transient:
        return (
            f"push to {repo_id} failed after {attempt} attempt(s): {_short(err)}; re-run the same command: "
            "files the Hub already holds are not uploaded again"
        )
    return f"push to {repo_id} failed: {_short(err)}"


def scrub(text: str, token: str | None) -> str:
    """``text`` with the token (and anything shaped like a Hub token) replaced by ``***``."""
    if token:
        text = text.replace(token, "***")
    return TOKEN_LIKE.sub("hf_***", text)
