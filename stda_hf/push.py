"""Publish a packaged dataset folder to the Hugging Face Hub: create the repo, upload, retry, keep the token secret.

    stda push hub/skin-lesions --repo-id stda/skin-lesions [--private] [--revision BRANCH] [--dry-run]

The token comes from ``HF_TOKEN`` or the saved ``hf auth login``; it is passed to ``huggingface_hub`` and
never printed, logged or written (error messages are scrubbed of it). Uploads are resumable: LFS objects the
Hub already holds are not sent again, so a retry after a failure (HTTP 429/5xx, a dropped connection) only
sends what is missing. Without Xet (``HF_HUB_DISABLE_XET=1``) the upload is one atomic commit, so the repo is
never left half-updated; with ``hf_xet`` installed (the default), ``upload_folder`` streams large folders in
several commits and re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import StdaError

logger = logging.getLogger(__name__)

STALE_PATTERNS = ["data/*.parquet"]
"""Remote files that a new upload replaces: shards the folder no longer has are deleted in the same commit."""
TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")


@dataclass
class PushConfig:
    """Settings of ``stda push``."""

    repo_id: str = "stda/skin-lesions"  # dataset repo on the Hub, <owner>/<name>
    private: bool = False  # create the repo private (an existing repo keeps its visibility)
    revision: str = ""  # branch to push to; created from main when missing ("" = main)
    dry_run: bool = False  # only list the files and sizes that would be uploaded
    commit_message: str = "Upload dataset with stda push"  # message of the upload commit
    retries: int = 3  # attempts for transient failures (HTTP 429/5xx, dropped connections)
    retry_wait: float = 2.0  # seconds before the first retry, doubled after each

    def __post_init__(self) -> None:
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise StdaError(f"--repo-id {self.repo_id!r} must be <owner>/<name>, e.g. stda/skin-lesions")
        if self.retries < 1:
            raise StdaError(f"--retries {self.retries} must be at least 1")
        if self.retry_wait < 0:
            raise StdaError(f"--retry-wait {self.retry_wait} must not be negative")


@dataclass
class PushResult:
    """What was (or, with ``dry_run``, would be) uploaded."""

    repo_id: str
    revision: str
    files: list[tuple[str, int]]  # (path in repo, bytes)
    commit_url: str | None  # None for a dry run
    dry_run: bool

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def list_upload(folder: str | Path) -> list[tuple[str, int]]:
    """The files of a packaged folder that would be uploaded, with sizes (hidden files and folders excluded).

    Raises
    ------
    StdaError
        When ``folder`` is not a finished ``stda package`` output (no card, no shards, or a package still in
        progress).
    """
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not list(folder.glob("data/*.parquet")):
        raise StdaError(
            f"{folder} is not a packaged dataset (README.md and data/*.parquet); run `stda package`"
        )
    if (folder / ".stda-package").exists():
        raise StdaError(f"{folder} holds an unfinished `stda package` run; re-run it to finish, then push")
    files = [
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return files


def push(folder: str | Path, cfg: PushConfig | None = None, token: str | None = None) -> PushResult:
    """Create the dataset repo if needed and upload ``folder`` to it.

    Parameters
    ----------
    folder : path
        A packaged dataset (``stda package`` output).
    cfg : PushConfig, optional
        Repo id, visibility, branch, retries.
    token : str, optional
        A Hub token; by default ``HF_TOKEN`` or the saved login.

    Returns
    -------
    PushResult
        The files uploaded and the commit URL.

    Raises
    ------
    StdaError
        No token, a refused token or repo, or failures that outlast the retries; the message never holds the
        token.
    """
    cfg = cfg or PushConfig()
    files = list_upload(folder)
    revision = cfg.revision or "main"
    if cfg.dry_run:
        return PushResult(cfg.repo_id, revision, files, commit_url=None, dry_run=True)
    token = token or _token()
    try:
        url = _with_retries(lambda: _upload(Path(folder), cfg, token), cfg)
    except StdaError as err:
        raise StdaError(scrub(str(err), token)) from None
    return PushResult(cfg.repo_id, revision, files, commit_url=url, dry_run=False)


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise StdaError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)"
        )
    return token


def _upload(folder: Path, cfg: PushConfig, token: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(cfg.repo_id, repo_type="dataset", private=cfg.private, exist_ok=True)
    if cfg.revision:
        api.create_branch(cfg.repo_id, branch=cfg.revision, repo_type="dataset", exist_ok=True)
    info = api.upload_folder(
        repo_id=cfg.repo_id,
        repo_type="dataset",
        folder_path=folder,
        revision=cfg.revision or None,
        commit_message=cfg.commit_message,
        ignore_patterns=[".*", "**/.*"],
        delete_patterns=STALE_PATTERNS,
    )
    return info.commit_url


def _with_retries(call, cfg: PushConfig):
    """Run ``call``; retry transient failures with exponential backoff; turn the rest into StdaError."""
    wait = cfg.retry_wait
    for attempt in range(1, cfg.retries + 1):
        try:
            return call()
        except Exception as err:
            transient = _is_transient(err)
            if not transient or attempt == cfg.retries:
                raise StdaError(_describe(err, cfg, attempt, transient)) from None
            logger.warning(
                "push attempt %d/%d failed (%s); retrying in %.1fs", attempt, cfg.retries, _short(err), wait
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


def _describe(err: Exception, cfg: PushConfig, attempt: int, transient: bool) -> str:
    status = _status(err)
    if status in (401, 403):
        return (
            f"the Hub refused the token for {cfg.repo_id} (HTTP {status}); log in with `hf auth login` or set "
            "HF_TOKEN to a token with write access to that namespace"
        )
    if transient:
        return (
            f"push to {cfg.repo_id} failed after {attempt} attempt(s): {_short(err)}; re-run the same command: "
            "files the Hub already holds are not uploaded again"
        )
    return f"push to {cfg.repo_id} failed: {_short(err)}"


def scrub(text: str, token: str | None) -> str:
    """``text`` with the token (and anything shaped like a Hub token) replaced by ``***``."""
    if token:
        text = text.replace(token, "***")
    return TOKEN_LIKE.sub("hf_***", text)
