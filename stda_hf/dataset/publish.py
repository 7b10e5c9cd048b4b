"""Publish a packaged dataset folder to the Hugging Face Hub: create the repo, upload, retry, keep the token secret.

    stda push hub/skin-lesions --repo-id stda/skin-lesions [--private] [--revision BRANCH] [--dry-run]

The token comes from ``HF_TOKEN`` or the saved ``hf auth login``; it is passed to ``huggingface_hub`` and
never printed, logged or written (error messages are scrubbed of it; :mod:`stda_hf.core.hub` does the upload). Uploads are resumable: LFS objects the
Hub already holds are not sent again, so a retry after a failure (HTTP 429/5xx, a dropped connection) only
sends what is missing. Without Xet (``HF_HUB_DISABLE_XET=1``) the upload is one atomic commit, so the repo is
never left half-updated; with ``hf_xet`` installed (the default), ``upload_folder`` streams large folders in
several commits and re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from stda_hf.core.errors import StdaError
from stda_hf.core.hub import Upload, upload_folder

logger = logging.getLogger(__name__)

STALE_PATTERNS = ["data/*.parquet"]
"""Remote files that a new upload replaces: shards the folder no longer has are deleted in the same commit."""


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
    upload = Upload(
        repo_id=cfg.repo_id,
        repo_type="dataset",
        private=cfg.private,
        revision=cfg.revision,
        commit_message=cfg.commit_message,
        retries=cfg.retries,
        retry_wait=cfg.retry_wait,
        delete_patterns=STALE_PATTERNS,
    )
    url = upload_folder(folder, upload, token)
    return PushResult(cfg.repo_id, revision, files, commit_url=url, dry_run=False)
